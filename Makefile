# Thin wrapper over CMake/Ninja. The two quick-start commands:
#   make demo    setup + build + the main job on a bundled model
#   make check   setup + build + every test (GoogleTest through ctest, and lit)
BUILD ?= build
ASAN_BUILD ?= build-asan
FUZZ_BUILD ?= build-fuzz
JOBS ?= $(shell nproc)
FUZZ_SECONDS ?= 600
DEMO_MODEL ?= tests/data/fixtures/tiny-deepseek

.PHONY: all setup configure build demo check check-asan fuzz bench clean

all: build

setup:
	@bash scripts/setup.sh

$(BUILD)/build.ninja:
	cmake -G Ninja -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release

configure: setup $(BUILD)/build.ninja

build: configure
	cmake --build $(BUILD) -j $(JOBS)

# The main job on a bundled model: inspect it, compress it with the default
# recipe (quality measured before and after), run the package.
demo: build
	$(BUILD)/tools/moec inspect $(DEMO_MODEL)
	$(BUILD)/tools/moec compress $(DEMO_MODEL) --recipe examples/recipes/default.json \
	    -o $(BUILD)/demo.moepkg --eval-data tests/data/brown/heldout.jsonl --eval-tokens 2048 \
	    --report $(BUILD)/demo-report.html
	$(BUILD)/tools/moec generate $(BUILD)/demo.moepkg --prompt "The committee said" -n 40
	@echo "report: $(BUILD)/demo-report.html (open it in a browser; JSON beside the package: $(BUILD)/demo.report.json)"

check: build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

# The whole test suite under AddressSanitizer + UBSan, built with clang.
check-asan: setup
	cmake -G Ninja -S . -B $(ASAN_BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	  -DCMAKE_C_COMPILER=clang-19 -DCMAKE_CXX_COMPILER=clang++-19 \
	  -DMOEC_ENABLE_SANITIZERS=ON -DMOEC_ENABLE_CUDA=OFF
	cmake --build $(ASAN_BUILD) -j $(JOBS)
	cd $(ASAN_BUILD) && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
	  ctest --output-on-failure -j $(JOBS)

# libFuzzer targets (files, manifests, modules, tokenizers, recipes); each
# runs FUZZ_SECONDS on its seed corpus, two at a time.
fuzz: setup
	cmake -G Ninja -S . -B $(FUZZ_BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	  -DCMAKE_C_COMPILER=clang-19 -DCMAKE_CXX_COMPILER=clang++-19 \
	  -DMOEC_ENABLE_FUZZERS=ON -DMOEC_ENABLE_CUDA=OFF
	cmake --build $(FUZZ_BUILD) -j $(JOBS) --target fuzz-safetensors-header fuzz-model-config \
	  fuzz-package-manifest fuzz-tokenizer fuzz-module fuzz-recipe
	bash fuzz/run.sh $(FUZZ_BUILD) $(FUZZ_SECONDS)

bench: build
	bash bench/run.sh $(BUILD)

clean:
	rm -rf $(BUILD) $(ASAN_BUILD) $(FUZZ_BUILD)
