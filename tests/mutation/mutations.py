"""The curated mutations of tests/mutation/run.py: small plausible bugs, one at a time.

Each entry: ``id``, ``file`` (path in the repository), ``old`` (an exact string that must occur
exactly once in that file: the run fails loudly otherwise, so this list follows the code),
``new`` (what it becomes), ``tests`` (the pytest arguments that must kill it: the relevant tests,
run with -x) and ``bug`` (the plausible mistake it models). When the code changes, update
``old``/``new`` here; keep each pattern small so that is easy.
"""

T_ACT = "tests/test_activations.py"
T_CPU = "tests/test_cpu.py"
T_LAYOUT = "tests/test_layout.py"
T_NUMBA = "tests/test_numba_cpu.py"
T_DISPATCH = "tests/test_dispatch.py"
T_OPS = "tests/test_ops.py"
T_EMU = "tests/test_cuda_emulation.py"
T_AUTOGRAD = "tests/test_ops_autograd.py"
T_CHAIN = "tests/test_ops_chain.py"
T_PATTERNS = "tests/test_fuse_patterns.py"
# test_activations.py's ties and limits against autograd (not its ties-at-zero table, selected as "ties_at_zero")
ACT_LIMITS = "(ties_and_limits or infinite_incoming or float_max_and_non_finite)"

MUTATIONS = [
    # ---- kernels/activations.py: the activation table (CPU and CUDA kernels and backend torch) ----
    dict(id="act-leaky-tie", file="kernels/activations.py",
         old='"where(z > 0.0, da, da * s)"', new='"where(z >= 0.0, da, da * s)"',
         tests=[T_ACT, "-k", "ties_at_zero and leaky_relu"],
         bug="leaky_relu'(0) = 1 instead of PyTorch's slope: >= where PyTorch uses >"),
    dict(id="act-relu-tie", file="kernels/activations.py",
         old='"where(a <= 0.0, 0.0, da)"', new='"where(a < 0.0, 0.0, da)"',
         tests=[T_ACT, "-k", "ties_at_zero and relu and not leaky"],
         bug="relu'(0) = 1 instead of PyTorch's 0: < where PyTorch uses <="),
    dict(id="act-gelu-constant", file="kernels/activations.py",
         old="+ z * 0.3989422804014327 * exp(-0.5 * z * z)", new="+ z * 0.7978845608028654 * exp(-0.5 * z * z)",
         tests=[T_CPU, "-k", "gradcheck and gelu"],
         bug="gelu' with sqrt(2/pi) where 1/sqrt(2*pi) belongs (two constants of the same family)"),
    dict(id="act-gelu-tanh-factor", file="kernels/activations.py",
         old="(1.0 + 3.0 * 0.044715 * z * z)", new="(1.0 + 0.044715 * z * z)",
         tests=[T_CPU, "-k", "gradcheck and gelu_tanh"],
         bug="gelu_tanh' forgets the 3 of d/dz z^3"),
    dict(id="act-silu-derivative", file="kernels/activations.py",
         old='"da * sigmoid(z) * (1.0 + z * (1.0 - sigmoid(z)))"', new='"da * sigmoid(z) * (1.0 + z * sigmoid(z))"',
         tests=[T_CPU, "-k", "gradcheck and silu"],
         bug="silu' with sigma where (1 - sigma) belongs"),
    dict(id="act-relu6-tie", file="kernels/activations.py",
         old='"where(a <= 0.0, 0.0, where(a >= 6.0, 0.0, da))"', new='"where(a <= 0.0, 0.0, where(a > 6.0, 0.0, da))"',
         tests=[T_ACT, "-k", f"{ACT_LIMITS} and relu6"],
         bug="relu6'(6) = 1 instead of autograd's 0 (hardtanh's backward zeroes both ends)"),
    dict(id="act-hardswish-tie", file="kernels/activations.py",
         old='"where(z <= -3.0, 0.0, where(z < 3.0, da * (z / 3.0 + 0.5), da))"',
         new='"where(z < -3.0, 0.0, where(z < 3.0, da * (z / 3.0 + 0.5), da))"',
         tests=[T_ACT, "-k", f"{ACT_LIMITS} and hardswish"],
         bug="hardswish'(-3) = -0.5 instead of autograd's 0"),
    dict(id="act-hardsigmoid-sixth", file="kernels/activations.py",
         old="da * 0.1666666716337204", new="da / 6.0",
         tests=[T_ACT, "-k", f"{ACT_LIMITS} and hardsigmoid and f64"],
         bug="hardsigmoid' as the exact 1/6, where PyTorch's backward multiplies by the float 1/6 in every dtype"),
    dict(id="act-softplus-threshold", file="kernels/activations.py",
         old='"where(z > 20.0, z, log1p(exp(z)))"', new='"where(z >= 20.0, z, log1p(exp(z)))"',
         tests=[T_ACT, "-k", f"{ACT_LIMITS} and softplus"],
         bug="softplus switches to z at the threshold itself, where PyTorch still takes log1p(exp(z))"),
    # ---- torch_ext/fuse/recognise.py: activation modules by what they compute ----
    dict(id="recognise-loose", file="torch_ext/fuse/recognise.py",
         old="_FACTOR = 64\n", new="_FACTOR = 2**40\n",
         tests=["tests/test_fuse_recognise.py", "-k", "refuses"],
         bug="a tolerance far above rounding: a formula with a cut constant is taken for gelu_tanh"),
    # ---- kernels/cpu.py: the Numba kernels ----
    dict(id="cpu-db-whole-path", file="kernels/cpu.py",
         old="            elif stage != 2:\n",
         new="            elif stage == 1:\n                grad(dz, dA, saved, 0, M, c0, c1, slope)\n            elif stage == 0:\n",
         tests=[T_CPU, "-k", "thread_counts and mkl"],
         bug="db not computed in the split (whole-matrix MKL, >= 256 rows) backward path"),
    dict(id="cpu-dw-ld-of-x", file="kernels/cpu.py",
         old="                 P[P_X], P[P_LDX], tx,", new="                 P[P_X], K, tx,",
         tests=[T_LAYOUT, T_CPU, "-k", "non_contiguous or thread_counts"],
         bug="dW's GEMM reads X with leading dimension K: wrong for padded or transposed X"),
    dict(id="cpu-last-row-band", file="kernels/cpu.py",
         old="t, tiles = tid - nth, ((M + tm - 1) // tm) * tiles_n", new="t, tiles = tid - nth, (M // tm) * tiles_n",
         tests=[T_CPU, "-k", "thread_counts"],
         bug="forward drops the last, shorter band of rows (M not a multiple of the band)"),
    dict(id="cpu-batch1-strided-x", file="kernels/cpu.py",
         old="and M == 1 and not tx:", new="and M == 1:",
         tests=[T_CPU, "-k", "batch_one"],
         bug="the batch-1 outer product reads a strided (transposed-stored) X row as contiguous"),
    dict(id="cpu-dx-band-offset", file="kernels/cpu.py",
         old="P[P_DZ] + r0 * N * item, N, False,", new="P[P_DZ] + r0 * item, N, False,",
         tests=[T_CPU, "-k", "thread_counts"],
         bug="dX's row bands start at row r0 of dZ computed without its row length"),
    dict(id="cpu-db-input-dtype", file="kernels/cpu.py",
         old="scratch = carray(f64_ptr(stack_address(2048)), (DB_CHUNK,))",
         new="scratch = carray(typed_ptr(stack_address(2048), zero), (DB_CHUNK,))",
         tests=[T_CPU, "-k", "db"],
         bug="db summed in the input dtype, not float64 as documented: an identity layer with 10**6 float32 "
             "rows of dA = 0.1 gives db = 100958.3 instead of 100000.0"),
    # ---- kernels/tiling.py: CUDA launch shapes ----
    dict(id="tiling-gemm-grid-rows", file="kernels/tiling.py",
         old="-(-m // CUDA_TILE_M)", new="m // CUDA_TILE_M",
         tests=[T_EMU, "-k", "own_engine and f32 and relu and not leaky"],
         bug="GEMM grid rounds the row blocks down: the last partial tile of rows is never computed"),
    dict(id="tiling-columns-grid", file="kernels/tiling.py",
         old="return (-(-n // CUDA_GRAD_COLS), 1, 1), (CUDA_GRAD_COLS, lanes, 1)",
         new="return (n // CUDA_GRAD_COLS, 1, 1), (CUDA_GRAD_COLS, lanes, 1)",
         tests=[T_EMU, "-k", "tiny_and_wide and 1x5x300"],
         bug="the dZ + db pass's column grid rounds down: the last partial block of columns is never computed"),
    # ---- kernels/cuda.py: CUDA launch plans ----
    dict(id="cuda-forward-ld-swap", file="kernels/cuda.py",
         old='("i64", ldx), ("i64", ldw), ("i64", n),', new='("i64", ldw), ("i64", ldx), ("i64", n),',
         tests=[T_EMU, "-k", "own_engine and f32 and relu and not leaky"],
         bug="own-engine forward launch passes W's leading dimension for X's and X's for W's (equal unless padded)"),
    dict(id="cuda-grad-row-stride", file="kernels/cuda.py",
         old='("i64", da_strides[0]),', new='("i64", da_strides[1]),',
         tests=[T_EMU, "-k", "vendor_engine and f32 and relu and not leaky"],
         bug="the dZ + db pass is given dA's column stride for its rows (the two strides mixed up)"),
    dict(id="cuda-dw-transpose", file="kernels/cuda.py",
         old="plan.append(Launch(\"gemm\", gemm_name(dtype, True)", new="plan.append(Launch(\"gemm\", gemm_name(dtype, False)",
         tests=[T_EMU, "-k", "own_engine and f32 and relu and not leaky"],
         bug="dW = dZ X instead of dZᵀ X: the transpose flag of the dW launch dropped"),
    # ---- kernels/fl_elementwise.cu: CUDA source (element-wise kernels of both engines) ----
    dict(id="cu-grad-missing-sync", file="kernels/fl_elementwise.cu",
         old="    __syncthreads();\n    if (threadIdx.y == 0 && n < N) {", new="    if (threadIdx.y == 0 && n < N) {",
         tests=[T_EMU, "-k", "thread_sanitizer_clean"],
         bug="db's lane sums read from shared memory without waiting for the other lanes to write them"),
    dict(id="cu-lane-sum-bound", file="kernels/fl_elementwise.cu",
         old="for (unsigned lane = 0; lane < blockDim.y; ++lane)", new="for (unsigned lane = 0; lane + 1 < blockDim.y; ++lane)",
         tests=[T_EMU, "-k", "vendor_engine and f32 and relu and not leaky"],
         bug="db's fixed-order sum over the row lanes stops one lane short (off-by-one bound)"),
    # ---- backend/layout.py: how tensors reach the kernels ----
    dict(id="layout-row-padding", file="backend/layout.py",
         old="return t, max(s0 if rows > 1 else cols, cols, 1), False", new="return t, cols, False",
         tests=[T_LAYOUT, "-k", "non_contiguous"],
         bug="a row-padded tensor is read as if its rows were packed (leading dimension = width)"),
    dict(id="layout-col-padding", file="backend/layout.py",
         old="return t, max(s1 if cols > 1 else rows, rows, 1), True", new="return t, max(rows, 1), True",
         tests=[T_LAYOUT, "-k", "non_contiguous"],
         bug="a padded column-major tensor (x = big[:, :K].t()) is read with leading dimension = rows"),
    # ---- backend/numba_cpu.py: launch plans ----
    dict(id="plan-key-without-strides", file="backend/numba_cpu.py",
         old="key = (x.shape, x.stride(), x.dtype,", new="key = (x.shape, x.dtype,",
         tests=[T_NUMBA, "-k", "other_strides"],
         bug="the plan cache key ignores X's strides: a plan for one layout serves another"),
    dict(id="plan-keeps-a-copy", file="backend/numba_cpu.py",
         old="if plan is not None and plan.kept:", new="if plan is not None:",
         tests=[T_NUMBA, "-k", "copied"],
         bug="a plan pointing into a per-call copy of a strided weight is cached: later calls read stale values"),
    dict(id="plan-drops-its-copy", file="backend/numba_cpu.py",
         old="return Plan(tuple(launches), keeps_z, tuple(t for t in made if t is not w and t is not b), kept)",
         new="return Plan(tuple(launches), keeps_z, (), kept)",
         tests=[T_NUMBA, "-k", "column_strided or strided_bias or evicted"],
         bug="lifetime: a plan does not own the copy (or zero bias) its addresses point into: the kernel reads freed memory"),
    dict(id="backend-db-mask", file="backend/numba_cpu.py",
         old="mask = (bool(mask[0]), bool(mask[1]), bool(mask[2]))", new="mask = (bool(mask[0]), bool(mask[1]), bool(mask[1]))",
         tests=[T_OPS, "-k", "requires_grad_subsets"],
         bug="db computed when dW is asked for instead of when db is (copy-paste in the mask)"),
    # ---- backend/__init__.py: dispatch ----
    dict(id="use-backend-restore", file="backend/__init__.py",
         old="_forced = _stack[-1][1] if _stack else None", new="_forced = None",
         tests=[T_DISPATCH, "-k", "nests"],
         bug="leaving a nested use_backend block forgets the outer block's choice"),
    dict(id="dispatch-key-dtype", file="backend/__init__.py",
         old="_environ_get(ENV_VAR) or None, device, x.dtype))\n    if module is None:  # fallbacks (which warn) and refusals (which raise) are not cached\n"
             "        forced = forced_backend()\n        name = select(x.device, x.dtype)\n        module = implementation(name)\n"
             "        if name != \"torch\" or forced:\n            _chosen[(forced, device, x.dtype)] = module",
         new="_environ_get(ENV_VAR) or None, device))\n    if module is None:  # fallbacks (which warn) and refusals (which raise) are not cached\n"
             "        forced = forced_backend()\n        name = select(x.device, x.dtype)\n        module = implementation(name)\n"
             "        if name != \"torch\" or forced:\n            _chosen[(forced, device)] = module",
         tests=[T_DISPATCH, "-k", "half_precision"],
         bug="the dispatch cache ignores the dtype: after a float32 call, bfloat16 goes to the float kernels"),
    # ---- backend/cpu_runtime.py: process state the CPU kernels depend on ----
    dict(id="fork-hook-removed", file="backend/cpu_runtime.py",
         old="os.register_at_fork(before=FORK.before, after_in_child=FORK.after_in_child)",
         new="pass  # the at-fork hook removed",
         tests=["tests/test_cpu_runtime.py", "-k", "fork"],
         bug="no at-fork hook: a forked child that calls the very tensors the parent ran on the parallel path "
             "reuses the parent's cached plan (FORK.check() in plan building never runs) and hangs in "
             "GOMP_parallel (the test must bound the child with a timeout, so the hang fails, not times out)"),
    # ---- torch_ext/ops.py: saved tensors, masks, chains ----
    dict(id="fn-saves-a", file="torch_ext/ops.py",
         old="ctx.save_for_backward(input, weight, bias, _kept(activation, a, z))",
         new="ctx.save_for_backward(input, weight, bias, a)",
         tests=[T_CPU, "-k", "gradcheck"],
         bug="backward always gets A, even for activations whose derivative needs Z (gelu, silu, leaky_relu)"),
    dict(id="chain-saves-a", file="torch_ext/ops.py",
         old='kept = [hs[i + 1] if saves == "a" else next(zs)', new='kept = [hs[i + 1] if True else next(zs)',
         tests=[T_CHAIN, "-k", "matches_pytorch"],
         bug="a chain saves A for every layer, even where the derivative needs Z"),
    dict(id="chain-earlier-layers", file="torch_ext/ops.py",
         old="earlier = needs[0] or any(needs[2:2 + i])", new="earlier = needs[0]",
         tests=[T_CHAIN, "-k", "requires_grad_subsets or matches_pytorch"],
         bug="a chain stops backward at the input when the input needs no gradient, leaving earlier layers without one"),
    dict(id="double-backward-no-graph", file="torch_ext/ops.py",
         old="    if torch.is_grad_enabled():  # g'(Z) from Z recomputed with a graph in X, W, b",
         new="    if False:  # g'(Z) from Z recomputed with a graph in X, W, b",
         tests=[T_AUTOGRAD, "-k", "second_derivatives_equal and gelu"],
         bug="create_graph=True backward uses the detached saved A/Z: second derivatives through g'(Z) are lost"),
    # ---- torch_ext/fuse/: fuse ----
    dict(id="fuse-leaky-slope", file="torch_ext/modules.py",
         old='return cls, {"negative_slope": negative_slope}', new="return cls, {}",
         tests=[T_PATTERNS, "-k", "every_activation_form and leaky"],
         bug="fuse drops the LeakyReLU's negative_slope (the fused layer uses the default 0.01)"),
    dict(id="fuse-active-dropout", file="torch_ext/fuse/patterns.py",
         old="spec[0] not in _COMMUTE_WITH_DROPOUT and drop.training:", new="spec[0] not in _COMMUTE_WITH_DROPOUT and not drop.training:",
         tests=[T_PATTERNS, "-k", "dropout_between"],
         bug="fuse checks the wrong mode: an active (training, p > 0) dropout before a non-commuting activation is fused over"),
]
