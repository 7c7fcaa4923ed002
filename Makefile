# Both entry points create .venv when it is missing and install everything they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
APT := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo) env DEBIAN_FRONTEND=noninteractive apt-get

.PHONY: demo test app bench chromium lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e ".[all,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m train.vtab --baseline linear

test: $(STAMP) chromium
	$(PY) -m pytest -q

app: $(STAMP)
	$(PY) -m apps.gradio_app

# The benchmark against PEFT (python -m bench --help); docs/benchmarks.md says how each published run was made.
bench: $(STAMP)
	$(PY) -m bench --workloads vit-b16,unet-small --repeats 2 --out runs/bench

# The app's browser test drives Debian's chromium through Playwright; pip cannot install it, apt-get can.
chromium:
	@command -v chromium >/dev/null || $(APT) install -y -qq chromium || { $(APT) update -qq && $(APT) install -y -qq chromium; }

lint: $(STAMP)
	$(PY) -m ruff check psoft_vision train apps tests bench

clean:
	rm -rf $(VENV) .pytest_cache

# The timm zoo sweep (bench/zoo.py): every timm family with PSOFT and OFTv2 (about 15 minutes on 2 CPU cores);
# rewrites the timm table of docs/models.md. `pytest -m zoo` runs the same checks as tests.
.PHONY: zoo
zoo: $(STAMP)
	$(PY) -m bench.zoo --out docs/models.md
