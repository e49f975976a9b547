# Two commands do all set-up on a fresh machine:  make demo  (main job)  and  make test  (test suite).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# probe demo: training runs at once, one thread each (the number of cores)
JOBS    ?= 2
FMNIST  := /usr/share/datasets/fashion-mnist
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test install install-test data clean-demo

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, on its own: on these machines `pip install torch torchvision` takes the local
# torch 2.14.1 / torchvision 0.29.1 pair; on a CUDA machine it takes the matching CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch torchvision
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# Fashion-MNIST from Debian's package (IDX files under $(FMNIST)).
data:
	@if [ ! -e $(FMNIST)/train-images-idx3-ubyte.gz ] && [ ! -e $(FMNIST)/train-images-idx3-ubyte ]; then \
		echo "installing Debian package dataset-fashion-mnist"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; \
	fi

demo: install data
	$(BIN)/probe demo --out runs/demo --figures figures --jobs $(JOBS)

test: install-test data
	$(BIN)/pytest -q

clean-demo:
	rm -rf runs/demo
