"""One POST /edit request: the reference image made again, the edit from its latent, the pair encoded.

The pair logic (edited constraints, the LCO sample that edits, the difference map) is in
service/counterfactual.py; this module checks the reference against the loaded model, runs both
samples through the service's batcher and builds the response.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
from typing import TYPE_CHECKING

import numpy as np
from starlette.responses import JSONResponse

from service.counterfactual import difference_png, edit_sample, probabilities_by_label
from service.dicom import DicomPlacement, SyntheticOrigin, random_uid
from service.http import error_response
from service.image_formats import MEDIA_TYPES, encode_image
from service.labels import LABELS
from service.lco import SampleRequest, SampleResult
from service.schemas import EditedImage, EditRequest, EditResponse

if TYPE_CHECKING:
    from service.service import CXRSynth


async def run_edit(service: CXRSynth, request: EditRequest) -> EditResponse | JSONResponse:
    """Answer one /edit request: 409 if the reference names another model version, else the pair."""
    loaded = service.model_ref.version
    if request.reference.model_version != loaded:
        return error_response(409, f"the reference was made by model version {request.reference.model_version}; "
                              f"this service runs {service.model_ref.name} version {loaded}: edit images of the "
                              "model that is loaded", {"reference_version": request.reference.model_version,
                                                        "loaded_version": loaded})
    if request.image_proximity > 0 and not service.engine.image_proximity:
        return error_response(409, f"model version {loaded} was exported before the image proximity term, so it "
                              "cannot keep an edit near the original's pixels: export the bundle again, or send "
                              '"image_proximity": 0', {"loaded_version": loaded})
    reference = request.reference.label_spec()
    spec = request.edit_spec()
    original_sample = SampleRequest(reference.target, reference.mask, request.reference.seed, request.reference.lco)
    original: SampleResult = await asyncio.wrap_future(service.batcher.submit([original_sample])[0])
    edited: SampleResult = await asyncio.wrap_future(
        service.batcher.submit([edit_sample(spec, original, request.proximity, request.image_proximity,
                                             request.lco)])[0])
    service.metrics.edits.labels(outcome="satisfied" if edited.satisfied else "unsatisfied").inc()

    request_id = secrets.token_hex(8)
    study_uid, series_uid = random_uid(), random_uid()  # the pair: one study, one series
    edited_labels = {LABELS[i]: bool(spec.target[i] > 0.5) for i in np.flatnonzero(spec.judged)}
    images = []
    for number, (result, labels, options) in enumerate(
            [(original, reference.constraints, request.reference.lco), (edited, edited_labels, request.lco)], start=1):
        origin = SyntheticOrigin(model_name=service.model_ref.name, model_version=loaded, seed=result.seed,
                                 requested=labels, lco_options=options.model_dump(),
                                 synthetic_patient_id=f"{request_id}-{number}")
        placement = DicomPlacement(study_uid, series_uid, random_uid(), number)
        data = await asyncio.to_thread(encode_image, result.image, request.format, origin, placement)
        images.append(EditedImage(
            data=base64.b64encode(data).decode("ascii"), labels=labels,
            probabilities=probabilities_by_label(result.probabilities),
            auditor_probabilities=auditor_probabilities(service, result.image), satisfied=result.satisfied,
            steps=result.steps))
    difference, scale = difference_png(original.image, edited.image)
    return EditResponse(
        request_id=request_id, model=service.model_ref, format=request.format,
        media_type=MEDIA_TYPES[request.format], add=list(spec.add), remove=list(spec.remove),
        before=images[0], after=images[1], difference=base64.b64encode(difference).decode("ascii"),
        difference_scale=round(scale, 6), latent_distance=round(float(np.linalg.norm(edited.latent - original.latent)), 6),
    )


def auditor_probabilities(service: CXRSynth, image: np.ndarray) -> dict[str, float] | None:
    """The bundle's auditor on one image [H, W], or None when the bundle has no auditor."""
    if service.verifier is None:
        return None
    return probabilities_by_label(service.verifier.auditor.probabilities(image[None])[0])
