"""The main job on the embedded default: `python -m service.demo` (what `make demo` runs).

1. Makes sure the demo bundle exists. The repository ships one in ``models/demo`` and pins the sha256
   of its manifest (which seals every graph's sha256) in ``models/demo.sha256``; a ``models/demo`` that
   does not match its pin is refused. Without a valid bundle there it trains one on procedural phantoms
   with ``python -m training.demo_bundle`` (what `make demo-bundle` runs: GAN, the LCO classifier,
   export; each step a training CLI subprocess with its own progress bar) and pins it.
2. Starts the service (``bentoml serve``) on localhost:3000 (``--port`` or ``CXRSYNTH_PORT``) with that
   bundle, after checking that the port is free (if not, it says which process holds it).
3. Asks POST /generate once per finding (and for "No Finding").
4. Writes the PNGs, their JSON descriptions and a captioned contact sheet to ``demo-output/``.
5. Prints where they are and a curl line, then keeps serving until Ctrl+C (``--exit`` stops).

On real radiographs (``--data nih:PATH``, ``make demo-real``: the 705-image NIH sample next to the
clone) the same steps train the `nih-sample-64` generator, the ``NIH_SAMPLE_MEMBERS`` ensemble and an
independent auditor into ``models/nih-sample-64`` (+ ``-auditor``), ask for ``REAL_FINDINGS`` only, and
put held-out real images of each finding beside the LCO images, every tile captioned with the LCO
classifier's and the auditor's probability; the auditor's agreement per finding is printed and saved.

Every process it starts (training steps, the server) runs in a session of its own and ends with it:
SIGINT, SIGTERM and SIGHUP stop the children before the demo exits, and on Linux a child also gets
SIGTERM if the demo is killed outright (service/processes.py).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from service.labels import LABELS, NO_FINDING
from service.processes import (
    PortInUse,
    Stopped,
    check_port_free,
    exit_on_signals,
    run_step,
    spawn,
    stop_group,
)
from service.settings import Settings, SettingsError, settings

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = ROOT / "models" / "demo"
DEMO_PIN = ROOT / "models" / "demo.sha256"  # sha256 of the shipped demo bundle's manifest.json
DEFAULT_OUTPUT = ROOT / "demo-output"
DEFAULT_RUNS = ROOT / "runs" / "demo"
# --data nih:PATH: the real-data presets are sized for the NIH sample, hence the names
REAL_BUNDLE = ROOT / "models" / "nih-sample-64"
REAL_AUDITOR = ROOT / "models" / "nih-sample-64-auditor"
REAL_OUTPUT = ROOT / "demo-output" / "nih-sample"
REAL_RUNS = ROOT / "runs" / "nih-sample"
# The findings the NIH sample has enough of (≥ 70 images each; every abnormal one also carries Pneumonia)
REAL_FINDINGS = (NO_FINDING, "Pneumonia", "Infiltration", "Effusion", "Atelectasis", "Edema")
PORT_HINT = "stop it, or pick another port with --port N (or CXRSYNTH_PORT=N)"
TILE = 160  # pixels per contact-sheet tile (images are upscaled with nearest neighbour)

def bundle_is_valid(bundle: Path) -> bool:
    from service.bundle import BundleError, verify_bundle

    if not (bundle / "manifest.json").is_file():
        return False
    try:
        verify_bundle(bundle)
    except BundleError as error:
        print(f"existing bundle is unusable ({error}); training a new one", file=sys.stderr)
        return False
    return True


def manifest_sha256(bundle: Path) -> str:
    """Hex sha256 of ``bundle``'s manifest.json, which holds the sha256 of every graph (a bundle's pin)."""
    return hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()


def check_pin(bundle: Path, pin: Path) -> None:
    """SystemExit unless the sha256 of ``bundle``'s manifest.json is the one ``pin`` holds."""
    expected = pin.read_text().strip()
    actual = manifest_sha256(bundle)
    if actual != expected:
        raise SystemExit(f"{bundle} is not the demo bundle this repository ships: the sha256 of its manifest is "
                         f"{actual}, {pin} pins {expected}. `git checkout -- models/demo models/demo.sha256` "
                         "restores the shipped one; `make demo-bundle` trains a new one from nothing and pins it.")


def auditor_is_valid(auditor: Path) -> bool:
    from service.auditor import Auditor, AuditorError

    if not (auditor / "auditor.json").is_file():
        return False
    try:
        Auditor.load(auditor)
    except AuditorError as error:
        print(f"existing auditor is unusable ({error}); training a new one", file=sys.stderr)
        return False
    return True


def train_bundle(bundle: Path, runs: Path, data: str = "phantoms", auditor: Path | None = None,
                 pin: Path | None = None) -> None:
    """Train the demo bundle with ``python -m training.demo_bundle`` (the training package's job); on
    ``nih:PATH`` data also the auditor, exported to ``auditor``; ``pin``: where to pin the result."""
    command = [sys.executable, "-m", "training.demo_bundle", "--bundle", str(bundle), "--runs", str(runs),
               "--data", data, *(["--auditor", str(auditor)] if auditor else []),
               *(["--pin", str(pin)] if pin else [])]
    returncode = run_step(command, cwd=ROOT)
    if returncode != 0:
        raise SystemExit(f"training the demo bundle failed with exit code {returncode}")
    if not bundle_is_valid(bundle):
        raise SystemExit(f"training finished but {bundle} holds no valid bundle")


def request_json(url: str, body: object | None = None, timeout: float = 600.0) -> tuple[int, object]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET",
                                     headers={"Content-Type": "application/json"} if data else {})
    token = settings().api_token
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def start_server(bundle: Path, host: str, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``bentoml serve`` on ``bundle`` (see :func:`service.processes.spawn`); stop it with
    :func:`service.processes.stop_group`. Its output goes to ``log_path``."""
    env = {**os.environ, "CXRSYNTH_BUNDLE": str(bundle)}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "bentoml", "serve", "service.service:CXRSynth",
               "--host", host, "--port", str(port), "--working-dir", str(ROOT)]
    with open(log_path, "wb") as log:  # the server keeps its own copy of the descriptor
        return spawn(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def wait_ready(process: subprocess.Popen[bytes], base_url: str, log_path: Path, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    with tqdm(desc="starting the service", total=None, unit="probe", leave=False) as bar:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise SystemExit(f"the service exited with code {process.returncode}; its log ends:\n{tail}")
            try:
                with urllib.request.urlopen(base_url + "/readyz", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            bar.update()
            time.sleep(0.5)
    raise SystemExit(f"the service was not ready within {timeout:.0f} s; see {log_path}")


def contact_sheet(rows: list[tuple[str, list[tuple[Image.Image, str]]]], path: Path) -> None:
    """One row per request: a caption column, then the images (grey or colour) with their label (one or
    more lines) underneath."""
    font = ImageFont.load_default(size=13)
    lines = max(label.count("\n") + 1 for _, tiles in rows for _, label in tiles)
    caption_width, label_height, pad = 190, 16 * lines, 6
    columns = max(len(tiles) for _, tiles in rows)
    width = caption_width + columns * (TILE + pad) + pad
    height = len(rows) * (TILE + label_height + pad) + pad
    sheet = Image.new("RGB", (width, height), color=(255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for row, (caption, tiles) in enumerate(rows):
        top = pad + row * (TILE + label_height + pad)
        draw.text((pad, top + TILE // 2 - 6), caption, fill=0, font=font)
        for column, (image, label) in enumerate(tiles):
            left = caption_width + column * (TILE + pad)
            sheet.paste(image.convert("RGB").resize((TILE, TILE), Image.Resampling.NEAREST), (left, top))
            draw.text((left, top + TILE + 2), label, fill=0, font=font)
    temporary = path.with_suffix(".tmp.png")
    sheet.save(temporary)
    temporary.replace(path)


def shown_probability(probabilities: np.ndarray, finding: str) -> float:
    """The probability a caption shows: the finding's, or for "No Finding" the largest of the 14."""
    return float(probabilities.max() if finding == NO_FINDING else probabilities[LABELS.index(finding)])


def tile_caption(title: str, judged: np.ndarray, audited: np.ndarray, finding: str) -> str:
    """Two lines under a tile: its title, then the LCO classifier's and the auditor's probability."""
    return f"{title}\nclf {shown_probability(judged, finding):.2f} aud {shown_probability(audited, finding):.2f}"


def judge_rows(bundle: Path, auditor_dir: Path, results: list[dict], count: int) -> tuple[list, list[dict]]:
    """The real-data sheet and agreement: per finding, the LCO images then up to ``count`` held-out real
    images of that finding, each captioned with the LCO classifier's ("clf") and the auditor's ("aud")
    probability of the finding (for "No Finding": the largest of the 14).

    Agreement per finding: the share of LCO images on which the auditor, at its own thresholds, sees
    the finding (for "No Finding": none of the 14), beside its rate on every held-out real image of
    that finding (what it recognises on real images at all)."""
    from service.auditor import Auditor
    from service.bundle import SessionTuning, load_bundle
    from service.png import decode_png

    auditor = Auditor.load(auditor_dir)
    lco_classifier = load_bundle(bundle, SessionTuning(providers=("CPUExecutionProvider",)))
    rows, agreement = [], []
    for result in results:
        finding, images = result["finding"], result["images"]
        lco_pixels = np.stack([decode_png(image["png"]) for image in images])
        lco_judged = np.array([[image["probabilities"][name] for name in LABELS] for image in images])
        lco_audited = auditor.probabilities(lco_pixels)
        real = auditor.examples(finding, len(auditor.held_out))
        real_pixels = (np.stack([pixels for _, pixels in real]) if real
                       else np.zeros((0, *lco_pixels.shape[1:]), np.float32))
        real_audited = auditor.probabilities(real_pixels)
        shown = real_pixels[:count]
        real_judged = 1.0 / (1.0 + np.exp(-lco_classifier.classify(shown[:, None])[0])) if len(shown) else []
        tiles = [(Image.open(io.BytesIO(image["png"])),
                  tile_caption(f"LCO {'ok' if image['satisfied'] else 'unsat'} {image['steps']} st", judged, audited, finding))
                 for image, judged, audited in zip(images, lco_judged, lco_audited)]
        tiles += [(Image.fromarray(np.uint8(np.round((pixels + 1.0) * 127.5))),
                   tile_caption(f"real {Path(example.name).stem}", judged, audited, finding))
                  for (example, _), pixels, judged, audited in zip(real, shown, real_judged, real_audited)]
        rows.append((f"{finding}\nLCO | real (held out)", tiles))
        agreement.append({"finding": finding, "images": len(images),
                          "lco_satisfied": int(sum(image["satisfied"] for image in images)),
                          "auditor_agrees": int(auditor.agrees(lco_audited, finding).sum()),
                          "held_out_real": len(real),
                          "auditor_on_real": int(auditor.agrees(real_audited, finding).sum())})
    return rows, agreement


def print_agreement(agreement: list[dict], auditor: Path) -> None:
    print(f"\nauditor agreement per requested finding (auditor: {auditor}):")
    print(f"  {'finding':<14} {'LCO satisfied':>14} {'auditor agrees':>15} {'auditor on held-out real':>25}")
    for row in agreement:
        real = (f"{row['auditor_on_real']}/{row['held_out_real']}" if row["held_out_real"] else "none held out")
        print(f"  {row['finding']:<14} {row['lco_satisfied']:>10}/{row['images']:<3} "
              f"{row['auditor_agrees']:>11}/{row['images']:<3} {real:>25}")


def run_demo(args: argparse.Namespace) -> int:
    bundle = args.bundle.resolve()
    auditor = args.auditor.resolve() if args.data else None
    pin = DEMO_PIN if bundle == DEFAULT_BUNDLE else None
    check_port_free(args.host, args.port, PORT_HINT)  # before training: an hour's work must not end here
    if not bundle_is_valid(bundle) or (auditor and not auditor_is_valid(auditor)):
        source = f"nih:{args.data}" if args.data else "phantoms"
        print(f"no demo bundle at {bundle}: training one on {source} (CPU, a while)")
        train_bundle(bundle, args.runs.resolve(), source, auditor, pin)
        check_port_free(args.host, args.port, PORT_HINT)
    elif pin is not None and pin.is_file():
        check_pin(bundle, pin)
    base_url = f"http://{args.host}:{args.port}"
    output = args.output.resolve()
    output.mkdir(parents=True, exist_ok=True)
    log_path = output / "service.log"
    process = start_server(bundle, args.host, args.port, log_path)
    try:
        wait_ready(process, base_url, log_path)
        print(f"service ready at {base_url} (log: {log_path})")
        rows = []
        results = []
        findings = list(REAL_FINDINGS) if args.data else [*LABELS, NO_FINDING]
        for row, finding in enumerate(tqdm(findings, desc="asking /generate per finding", unit="finding")):
            # each finding starts from its own latents, so the sheet also shows the generator's variety
            body = {"labels": [finding], "count": args.count, "seed": args.seed + 1000 * row}
            status, response = request_json(base_url + "/generate", body)
            if status != 200:
                raise SystemExit(f"/generate for {finding} answered {status}: {response}")
            folder = output / finding.replace(" ", "_")
            folder.mkdir(exist_ok=True)
            tiles = []
            for image in response["images"]:
                png = image["png"] = base64.b64decode(image.pop("data"))
                (folder / f"{image['index']:02d}.png").write_bytes(png)
                shown = image["probabilities"].get(finding) if finding != NO_FINDING else max(image["probabilities"].values())
                mark = "ok" if image["satisfied"] else "unsat"
                label = f"p={shown:.2f} {mark} {image['steps']} st" if finding != NO_FINDING else f"max p={shown:.2f} {mark}"
                tiles.append((Image.open(io.BytesIO(png)), label))
            satisfied = sum(image["satisfied"] for image in response["images"])
            rows.append((f"{finding}\n{satisfied}/{len(tiles)} satisfied", tiles))
            results.append({"finding": finding, **{k: v for k, v in response.items() if k != "images"},
                            "images": response["images"]})
        if auditor:
            rows, agreement = judge_rows(bundle, auditor, results, args.count)
            print_agreement(agreement, auditor)
        sheet = output / "contact_sheet.png"
        contact_sheet(rows, sheet)
        for result in results:
            for image in result["images"]:
                del image["png"]
        (output / "results.json").write_text(json.dumps(
            {"results": results, "auditor_agreement": agreement} if auditor else results, indent=2))
        total = sum(len(r["images"]) for r in results)
        satisfied = sum(sum(i["satisfied"] for i in r["images"]) for r in results)
        print(f"\n{total} images ({satisfied} satisfied) in {output}/<finding>/, contact sheet: {sheet}")
        print("Ask the API yourself:")
        print(f"  curl -s -X POST {base_url}/generate -H 'Content-Type: application/json' "
              "-d '{\"labels\": {\"Effusion\": true, \"Pneumothorax\": false}, \"count\": 2}'")
        print(f"  curl -s {base_url}/labels    # vocabulary, thresholds, prevalence;  API docs: {base_url}/")
        if args.exit:
            return 0
        print("Serving until Ctrl+C ...", flush=True)
        try:
            returncode = process.wait()
        except Stopped:
            return 0  # the way a serving demo is meant to end
        print(f"the service exited by itself with code {returncode}; see {log_path}", file=sys.stderr)
        return 1
    finally:
        stop_group(process)


def port_number(text: str) -> int:
    """argparse type: a TCP port 1-65535 (argparse turns the ValueError into a usage message)."""
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(text)
    return port


def nih_folder(text: str) -> Path:
    """argparse type of --data: ``nih:PATH``, PATH a folder holding an NIH Data_Entry CSV."""
    kind, _, path = text.partition(":")
    if kind != "nih" or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected nih:PATH, a folder in the NIH ChestX-ray14 layout")
    folder = Path(path).resolve()
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is not a directory (nih:PATH names the folder of Data_Entry*.csv)")
    if not any(folder.glob("Data_Entry*.csv*")):
        raise argparse.ArgumentTypeError(f"{path} holds no Data_Entry*.csv: not the NIH ChestX-ray14 layout")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.demo", description=__doc__.split("\n")[0])
    try:
        config = settings()
    except SettingsError as error:
        parser.error(str(error))
    parser.add_argument("--data", type=nih_folder, metavar="nih:PATH",
                        help="train on real radiographs in the NIH layout (e.g. nih:../shared/data/nih-sample) "
                             "instead of phantoms, and audit the result")
    parser.add_argument("--bundle", type=Path,
                        help=f"bundle directory; trained here if missing (default: {DEFAULT_BUNDLE.relative_to(ROOT)}, "
                             f"or CXRSYNTH_DEMO_BUNDLE; with --data {REAL_BUNDLE.relative_to(ROOT)})")
    parser.add_argument("--auditor", type=Path, default=REAL_AUDITOR, help="with --data: the exported auditor")
    parser.add_argument("--runs", type=Path, help="where the training runs go")
    parser.add_argument("--output", type=Path, help="where PNGs and the contact sheet go")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=port_number, default=config.port,
                        help=f"port to serve on (default: CXRSYNTH_PORT, else {Settings.model_fields['port'].default})")
    parser.add_argument("--count", type=int, default=4, help="images per finding")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exit", action="store_true", help="stop the service after the demo instead of serving on")
    args = parser.parse_args(argv)
    real = args.data is not None
    args.bundle = args.bundle or (REAL_BUNDLE if real else config.demo_bundle or DEFAULT_BUNDLE)
    args.runs = args.runs or (REAL_RUNS if real else DEFAULT_RUNS)
    args.output = args.output or (REAL_OUTPUT if real else DEFAULT_OUTPUT)
    with exit_on_signals():
        try:
            return run_demo(args)
        except PortInUse as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        except Stopped as stop:
            # run_demo's clean-up has run: the server and any training step are stopped
            print(f"{stop}; everything the demo started is stopped", file=sys.stderr)
            return stop.exit_code


if __name__ == "__main__":
    sys.exit(main())
