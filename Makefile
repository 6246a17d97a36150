# make demo : .venv + a tiny SAT checkpoint loaded by 4 ranks (TP=2 x DP=2) under torchrun, then a tiny CogVideoX
#             pipeline sampled on the same ranks (TP 2 x CFG parallel 2) into demo.mp4
# make test : .venv + the whole test suite
PY       ?= python3
VENV     := .venv
STAMP    := $(VENV)/.installed
# Pins: requirements.txt (runtime; setup.py and docker/Dockerfile read it too) and requirements-test.txt.
# deepspeed's ops are JIT-only (DS_BUILD_OPS=0); torch is pinned in the same command, so deepspeed cannot pull
# another torch. The pinned torch from PyPI is the CUDA build on Linux x86-64 (what `make gpu-check` needs);
# a machine whose pip serves a +cpu wheel (this dev machine's) gets CPU torch.
REQS     := requirements.txt requirements-test.txt

.PHONY: venv demo test bench bench-gpu gpu-check soak fuzz clean sat-ref-venv
venv: $(STAMP)

$(STAMP): setup.py Makefile $(REQS)
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	DS_BUILD_OPS=0 $(VENV)/bin/pip install -q $(addprefix -r ,$(REQS))
	$(VENV)/bin/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node=4 -m sat_dist demo --tp 2

# bench : `sat-dist bench` on a generated ~1.2 GiB checkpoint (and a .safetensors file of the same
# tensors), 4 ranks at TP=4: sat_dist beside the storage limit, SAT-style, mmap, safetensors,
# fastsafetensors and the Run:ai streamer. BENCH_ARGS: e.g. --cold --repeat 5. Results in .cache/bench/.
BENCH_DIR  ?= /tmp/sat_dist_bench
BENCH_ARGS ?= --repeat 3
bench: $(STAMP)
	mkdir -p .cache/bench
	$(VENV)/bin/python bench/make_checkpoint.py --dir $(BENCH_DIR) > .cache/bench/paths
	$(VENV)/bin/sat-dist bench $$(sed -n 1p .cache/bench/paths) --world 4 --tp 4 $(BENCH_ARGS) --json .cache/bench/sat.json
	$(VENV)/bin/sat-dist bench $$(sed -n 2p .cache/bench/paths) --world 4 --tp 4 $(BENCH_ARGS) --json .cache/bench/safetensors.json
	$(VENV)/bin/sat-dist bench $$(sed -n 1p .cache/bench/paths) --world 4 --tp 2 --methods limit sat_dist $(BENCH_ARGS) --json .cache/bench/tp2dp2.json

# bench-sample : `sat-dist bench-sample` on a tiny random-weight 5B-style pipeline (12 heads, 4 layers, 17x128x192;
# written once into $(BENCH_SAMPLE_DIR)), 4 CPU ranks: TP 4 vs SP 4 vs TP 2 x SP 2 vs TP 2 x CFG parallel, one
# warm-up then BENCH_SAMPLE_ARGS (--steps 4 --repeat 2) timed samples each; ratios against TP 4. Results in .cache/bench/.
BENCH_SAMPLE_DIR  ?= /tmp/sat_dist_bench_sample
BENCH_SAMPLE_ARGS ?= --steps 4 --repeat 2
.PHONY: bench-sample
bench-sample: $(STAMP)
	mkdir -p .cache/bench
	OMP_NUM_THREADS=1 $(VENV)/bin/sat-dist bench-sample $(BENCH_SAMPLE_DIR)/tiny-5b --tiny 5b --world 4 \
	  --layouts 4,1,off 1,4,off 2,2,off 2,1,on $(BENCH_SAMPLE_ARGS) --json .cache/bench/sample.json

# bench-gpu : on a machine with GPUs, TP 1/2/4 (as many as it has, one rank per GPU): sat_dist onto
# cuda:LOCAL_RANK beside the pinned `copy_` H2D ceiling (`h2d`; compare the GiB/s column) and the
# storage limit; then, with 2+ GPUs, TP=1 x DP=2 with the exchange off and on. Results in .cache/bench/.
bench-gpu: $(STAMP)
	mkdir -p .cache/bench
	$(VENV)/bin/python bench/make_checkpoint.py --dir $(BENCH_DIR) > .cache/bench/paths
	n=$$($(VENV)/bin/python -c "import torch; print(torch.cuda.device_count())"); test $$n -gt 0 || \
	  { echo "bench-gpu: no GPU visible"; exit 1; }; \
	for tp in 1 2 4; do test $$tp -le $$n || break; \
	  $(VENV)/bin/sat-dist bench $$(sed -n 1p .cache/bench/paths) --world $$tp --tp $$tp --methods limit h2d sat_dist \
	    $(BENCH_ARGS) --json .cache/bench/gpu_tp$$tp.json || exit 1; done; \
	if test $$n -ge 2; then for x in off on; do \
	  $(VENV)/bin/sat-dist bench $$(sed -n 1p .cache/bench/paths) --world 2 --tp 1 --methods limit sat_dist \
	    load.exchange=$$x $(BENCH_ARGS) --json .cache/bench/gpu_dp2_$$x.json || exit 1; done; fi

# gpu-check : on a machine with 1-8 GPUs (tests/gpu_check.py), in <= 8 minutes: one table of CHECK | PASS/FAIL/SKIP |
# detail rows (env, GPU digests == CPU digests, TP=2 forward, exchange, bounded exits, a named OOM, bench-gpu, the
# CogVideoX engine in bf16); exits 1 if a row FAILs, 2 with no GPU. GPU_CHECK_ARGS: --cpu (the same rows on CPU + gloo),
# --only NAME, --keep (keep the temp folder and every command's log).
GPU_CHECK_ARGS ?=
gpu-check: $(STAMP)
	$(VENV)/bin/python tests/gpu_check.py $(GPU_CHECK_ARGS)

# lint-imports: the dependency contracts in .importlinter (layers point one way, no cycles).
test: $(STAMP)
	$(VENV)/bin/lint-imports .importlinter
	$(VENV)/bin/python -m pytest -q tests $(PYTEST_ARGS)

# soak : SOAK_TRIALS (50) randomized kill/stall/interrupt trials under torchrun, mpirun and srun (tests/fault_lib.py):
# each prints its survivors' times to exit; the last line gives the worst. SOAK_ARGS: e.g. --seed 7 --timeout 8.
# fuzz : the hypothesis fuzz targets (tests/test_fuzz.py) with FUZZ_EXAMPLES (5000) examples each.
SOAK_TRIALS ?= 50
FUZZ_EXAMPLES ?= 5000
soak: $(STAMP)
	$(VENV)/bin/python tests/fault_lib.py --trials $(SOAK_TRIALS) $(SOAK_ARGS)
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz SAT_DIST_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(VENV)/bin/python -m pytest -q -s tests/test_fuzz.py

# sat-ref-venv : .venv-sat, the real SwissArmyTransformer 0.4.12 for tests/test_sat_reference.py.
# sat is installed --no-deps; SAT_PKGS is exactly what `import sat` + get_args/save_checkpoint need
# (measured: requests, triton, transformers, wandb, tensorboardX, datasets are unconditional imports;
# deepspeed is imported by get_args; einops by the rotary module). The stamp holds this spec: same spec,
# no work; a changed spec reinstalls. Built once (~2 min, ~2.5 GB), then cached.
SAT_VENV := .venv-sat
TORCH_PIN := $(shell grep -m1 "^torch==" requirements.txt)
SAT_PKGS := $(TORCH_PIN) numpy==2.4.6 deepspeed==0.19.8 einops==0.8.2 requests==2.34.2 triton==3.9.0 \
            transformers==5.24.0 wandb==0.31.0 tensorboardX==2.6.5 datasets==5.2.0
SAT_SPEC := swissarmytransformer==0.4.12 --no-deps + $(SAT_PKGS)

sat-ref-venv:
	@if [ "$$(cat $(SAT_VENV)/.installed 2>/dev/null)" != "$(SAT_SPEC)" ]; then \
	  set -e; start=$$(date +%s); \
	  test -x $(SAT_VENV)/bin/python || $(PY) -m venv $(SAT_VENV); \
	  DS_BUILD_OPS=0 nice $(SAT_VENV)/bin/pip install -q $(SAT_PKGS); \
	  nice $(SAT_VENV)/bin/pip install -q --no-deps swissarmytransformer==0.4.12; \
	  $(SAT_VENV)/bin/python -c "import sat" >/dev/null 2>&1 || $(SAT_VENV)/bin/python -c "import sat"; \
	  echo "$(SAT_SPEC)" > $(SAT_VENV)/.installed; \
	  echo "$(SAT_VENV): built in $$(( $$(date +%s) - start )) s, $$(du -sh $(SAT_VENV) | cut -f1)"; \
	fi

clean:
	rm -rf $(VENV) .venv-* .cache

# replicas : header-exact, real-size sparse replicas of every CogVideoX release component (sat_dist/testing/replica.py):
# the five DiTs in the diffusers and SAT layouts, the T5-XXL encoder and the VAE, in $(REPLICA_DIR)/<component>[-sat]/
# (~107 GB apparent, a few MiB of disk: the data are holes). REPLICA_ARGS: e.g. --fill random (real bytes, to time I/O).
REPLICA_DIR  ?= /tmp/sat_dist_replicas
REPLICA_ARGS ?=
.PHONY: replicas
replicas: $(STAMP)
	$(VENV)/bin/python -m sat_dist.testing.replica $(REPLICA_DIR) --component all --layout both $(REPLICA_ARGS)

# bench-real : the replicas (make replicas first) loaded at real size, TP 1/2/4 as 24 GiB allows: per-rank bytes
# read == the read plan, peak RSS <= the rank's tensors + 300 MiB, seconds beside the limit (bench/real_bench.py).
# Sparse replicas time no I/O: for timing, make replicas REPLICA_ARGS="--fill random", then BENCH_REAL_ARGS=--cold.
BENCH_REAL_ARGS ?=
# bench-lora : a rank-128 LoRA on the 5B DiT replica (make replicas first): load + LoRA against set_loras switches
# (seconds, bytes read per rank; bench/lora_bench.py).
.PHONY: bench-lora
bench-lora: $(STAMP)
	$(VENV)/bin/python bench/lora_bench.py --transformer $(REPLICA_DIR)/CogVideoX-5b/transformer $(BENCH_LORA_ARGS)

.PHONY: bench-real
bench-real: $(STAMP)
	$(VENV)/bin/python bench/real_bench.py $(REPLICA_DIR) $(BENCH_REAL_ARGS)
