"""Save a bundle into the local BentoML model store, so that ``bentoml build`` packages it.

The stored model holds exactly the bundle's files, so ``service.bundle.load_bundle("<name>:<version>")``
verifies and loads it like a directory. The store lives under ``$BENTOML_HOME/models`` (default
``~/bentoml``). The model's version is the manifest's, so a tag names one bundle everywhere.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from service.bundle import MANIFEST_NAME, verify_bundle

_TAG_PART = re.compile(r"^[a-z0-9]([-._a-z0-9]*[a-z0-9])?$")


def model_tag(name: str, version: str) -> str:
    """``name:version`` as BentoML spells tags (lower case; letters, digits, '-', '_', '.')."""
    def clean(part: str) -> str:
        part = re.sub(r"[^-._a-z0-9]+", "-", part.lower()).strip("-._")
        if not _TAG_PART.match(part):
            raise ValueError(f"{part!r} cannot be part of a BentoML model tag")
        return part

    return f"{clean(name)}:{clean(version)}"


def save_to_model_store(bundle_dir: str | os.PathLike[str], name: str | None = None) -> str:
    """Copy a verified bundle into the BentoML model store; return its tag.

    Saving the same bundle twice returns the existing tag; a different bundle under an existing tag
    is an error (bump the version instead).
    """
    import bentoml
    from bentoml.exceptions import NotFound

    bundle_dir = Path(bundle_dir)
    manifest = verify_bundle(bundle_dir)
    tag = model_tag(name or manifest.name, manifest.version)
    try:
        existing = bentoml.models.get(tag)
    except NotFound:
        existing = None
    if existing is not None:
        stored = verify_bundle(existing.path)
        if stored.manifest_sha256 != manifest.manifest_sha256:
            raise FileExistsError(f"the model store already holds a different bundle as {tag}; export with a new version")
        return str(existing.tag)
    metadata = {
        "schema_version": manifest.schema_version,
        "bundle_name": manifest.name,
        "bundle_version": manifest.version,
        "resolution": manifest.resolution,
        "latent_dim": manifest.latent_dim,
        "manifest_sha256": manifest.manifest_sha256,
        "classifier_mean_auroc": manifest.provenance.classifier_mean_auroc,
    }
    with bentoml.models.create(tag, labels={"kind": "cxrsynth-bundle"}, metadata=metadata) as model:
        for filename in (MANIFEST_NAME, *sorted(manifest.files)):
            shutil.copyfile(bundle_dir / filename, Path(model.path) / filename)
    return str(model.tag)
