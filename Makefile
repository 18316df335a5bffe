# The targets users type. CMake does the building underneath.
BUILD      ?= build
BUILD_ASAN ?= build-asan
JOBS       ?= $(shell nproc 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null || echo 2)

.PHONY: all deps demo test test-asan test-cuda bench bench-cuda clean

all:
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release >/dev/null
	@cmake --build $(BUILD) -j $(JOBS)

deps:
	@scripts/install-deps.sh

demo: deps all
	@scripts/demo.sh $(BUILD)

test: deps all
	@tests/run.sh $(BUILD)

test-asan: deps
	@cmake -S . -B $(BUILD_ASAN) -DCMAKE_BUILD_TYPE=Debug -DDT_SANITIZE=ON >/dev/null
	@cmake --build $(BUILD_ASAN) -j $(JOBS)
	@ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 tests/run.sh $(BUILD_ASAN)

# On a GPU machine: every CUDA op against its CPU reference (fails if there is no device).
test-cuda: all
	@test -x $(BUILD)/deltatune_test_cuda || { echo "test-cuda: no CUDA build (nvcc not found)" >&2; exit 1; }
	@$(BUILD)/deltatune_test_cuda | tee /dev/stderr | grep -q '^cuda: [0-9]* passed, 0 failed$$'

bench: deps all
	@bench/bench.sh $(BUILD)

# On a GPU machine: deltatune's CUDA training step against transformers + PEFT (needs torch,
# transformers and peft); appends the table to bench/RESULTS.md.
bench-cuda: all
	@bench/bench_cuda.sh $(BUILD)

clean:
	rm -rf $(BUILD) $(BUILD_ASAN)
