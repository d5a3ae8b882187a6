# The two commands a newcomer needs:  `make demo`  and  `make test`.
# Both create .venv with the CPU build of torch and the project installed, then run.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-bundle demo-real test venv lint clean system-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[train,serve,study,dev]"
	touch $(STAMP)

venv: $(STAMP)

# One plain command, which make runs without a shell: make's SIGTERM reaches the demo itself.
# It serves the demo bundle the repository ships (models/demo, checked against models/demo.sha256).
demo: $(STAMP)
	$(BIN)/python -m service.demo

# The shipped demo bundle trained again from nothing on phantoms, and pinned (BENCHMARKS.md: time).
demo-bundle: $(STAMP)
	$(BIN)/python -m training.demo_bundle --bundle models/demo --runs runs/demo --pin models/demo.sha256

# The same on real radiographs: the 705-image NIH sample next to the clone (docs/real-data.md).
NIH_SAMPLE ?= ../shared/data/nih-sample
demo-real: $(STAMP)
	$(BIN)/python -m service.demo --data nih:$(NIH_SAMPLE)

# Debian packages the tests drive for real: headless Chromium (HTML reports, the reader study's browser
# test), a PostgreSQL server started on loopback, and dciodvfy (dicom3tools) validating DICOM output.
# Installed only when missing.
SYSTEM_PACKAGES := chromium chromium-driver postgresql dicom3tools
system-deps:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing $$missing"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# One pytest worker per core; each test module stays on one worker, so its servers start once.
TEST_WORKERS ?= auto
test: lint system-deps
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check training service study tests benchmarks scripts

clean:
	rm -rf $(VENV) runs demo-output build dist *.egg-info
