"""Procedural chest x-ray phantoms: labelled, deterministic, any power-of-two size from 32² to 1024²."""

from training.phantoms.render import Scene, make_scene, render_phantom, sample_phantom

__all__ = ["Scene", "make_scene", "render_phantom", "sample_phantom"]
