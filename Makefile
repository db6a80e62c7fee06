# Flotilla quick start on a fresh Debian 12 machine:
#   make run    builds and runs the main job (8 threads on the CPU backend)
#   make test   builds and runs the whole test suite
# Each installs the Debian packages it lacks (as root, or through sudo) and
# configures and builds from scratch when needed. CUDA is built when nvcc is
# found (FLOTILLA_CUDA=AUTO); GPU tests are reported as skipped without a GPU.

BUILD ?= build
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=
FLOTILLA_CUDA ?= AUTO

# Debian packages the build and tests need.
DEPS := build-essential cmake ninja-build pkg-config libgtest-dev libgmock-dev \
        libbenchmark-dev libcli11-dev nlohmann-json3-dev libopenblas-dev gnuplot-nox

.PHONY: all deps configure build run test bench clean

all: build

deps:
	@scripts/ensure_deps.sh $(DEPS)

$(BUILD)/build.ninja: | deps
	cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=Release -DFLOTILLA_CUDA=$(FLOTILLA_CUDA) $(CMAKE_FLAGS)

configure: $(BUILD)/build.ninja

build: deps configure
	cmake --build $(BUILD) -j $(JOBS)

# The main job: 8 threads running the seed's MLP concurrently on the CPU
# backend, every output checked against a single-thread reference (README).
run: build
	$(BUILD)/flotilla run --backend cpu --threads 8 --requests 4000

test: build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS) --timeout 900

bench: build
	$(BUILD)/flotilla bench --out $(BUILD)/bench

clean:
	rm -rf $(BUILD)
