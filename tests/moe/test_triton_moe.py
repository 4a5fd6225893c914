"""The Triton stage (xmoe/moe/backends/triton_moe.py) against a float64 per-pair loop, on CPU in
Triton's interpreter: the output and every gradient (input, combine weights, each weight and
bias), for every activation, with and without biases, with an idle expert, a one-row expert,
experts of one row tile and of a tile plus one, tokens with no expert, and padding rows.

Why the kernels run in a subprocess: Triton's interpreter works only if TRITON_INTERPRET=1 is
set before triton itself is imported (triton.language's own helpers, tl.cdiv or tl.sum, are
@triton.jit functions built at import; set later, they stay compiled-mode functions and fail
inside an interpreted kernel), and the rest of the suite may import triton first. So
``kernel_results`` builds every case here, runs them all in one fresh Python started with the
variable set (``run_jobs``), and gets the outputs and gradients back; the checks, and the
float64 loop they are held to, run in this process. Every test loads the triton_moe.py next to
it by path (``load_copy``), whatever copy of xmoe is installed.

The interpreter's blocks are 16 rows x 32 columns x 32 deep (INTERPRETER_BLOCKS); D = 40 and
F = 24 end every column and reduction loop in a partial block.

Besides: every kernel goes through Triton's real compiler to an sm_90 cubin (no GPU needed), and
a gpu-marked test runs the compiled kernels where CUDA is (float64 reference, torch's sync debug
mode set to raise, a CUDA graph capture).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import oracle

pytest.importorskip("triton", reason="the Triton tests need triton (in the dev extra, Linux only)")

MODULE_FILE = Path(__file__).parents[2] / "src/xmoe/moe/backends/triton_moe.py"
T, D, F, E = 20, 40, 24, 5
# Pairs per expert: idle, one row, exactly one row tile, a tile plus one, part of a tile.
COUNTS = (0, 1, 16, 17, 7)
PAD = 5  # padding rows after offsets_E[-1], with garbage weights
NO_EXPERT = (18, 19)  # tokens that no expert takes
PARAMS = ("w1", "b1", "w2", "b2", "w3", "b3")
GRADS = ("x", "weight") + PARAMS
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "swiglu")


# ----------------------------------------------------------------------------- cases and the oracle


def make_case(activation: str, bias: bool, seed: int = 0, counts=COUNTS, pad: int = PAD, dtype=torch.float32) -> dict:
    """Routing (pairs sorted by expert; a token takes 0 to 4 experts) and float64 leaves at
    nn.Linear-like scale, so activations take both signs; x and the weights are rounded to
    ``dtype`` first, so the oracle sees exactly what the kernels get."""
    gen = torch.Generator().manual_seed(seed)
    takers = [t for t in range(T) if t not in NO_EXPERT]
    tokens = [sorted(takers[i] for i in torch.randperm(len(takers), generator=gen)[:n].tolist()) for n in counts]
    padding = torch.randint(0, T, (pad,), generator=gen).tolist()
    weight = torch.rand(sum(counts) + pad, generator=gen, dtype=torch.float64)
    weight[sum(counts):] = 7.0  # padding: garbage that must not matter

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype).double().requires_grad_()

    gated = activation == "swiglu"
    return dict(
        x=randn(T, D),
        token_idx=torch.tensor([t for group in tokens for t in group] + padding, dtype=torch.int64),
        weight=weight.float().double().requires_grad_(),
        offsets=torch.tensor(counts).cumsum(0).to(torch.int32),
        w1=randn(E, D, F, scale=D**-0.5),
        b1=randn(E, F, scale=0.5) if bias else None,
        w2=randn(E, F, D, scale=F**-0.5),
        b2=randn(E, D, scale=0.5) if bias else None,
        w3=randn(E, D, F, scale=D**-0.5) if gated else None,
        b3=randn(E, F, scale=0.5) if bias and gated else None,
        activation=activation,
        counts=counts,
        g=torch.randn(T, D, generator=gen, dtype=torch.float64),
    )


def float64_loop(case: dict) -> torch.Tensor:
    """out[t] = sum over the pairs n of token t of weight[n] * FFN_e(x_t), one pair at a time."""
    P = oracle.Params(router=None, **{k: case[k] for k in PARAMS})
    rows = [case["x"].new_zeros(D) for _ in range(T)]
    n = 0
    for e, count in enumerate(case["counts"]):
        for _ in range(count):
            t = int(case["token_idx"][n])
            rows[t] = rows[t] + case["weight"][n] * oracle.ffn(case["x"][t], P, e, case["activation"])
            n += 1
    return torch.stack(rows)


def reference(case: dict):
    """The loop's output and the gradients of every leaf for the upstream gradient g."""
    out = float64_loop(case)
    names = [k for k in GRADS if case[k] is not None]
    grads = torch.autograd.grad(out, [case[k] for k in names], case["g"])
    return out.detach(), dict(zip(names, grads))


def job(case: dict, dtype: torch.dtype, requires_grad=GRADS, grad_mode: bool = True, **changes) -> dict:
    """What the subprocess needs to run one case: inputs in the kernels' dtypes (combine weights
    fp32), which leaves require grad, and ``changes`` that replace arguments (bad inputs)."""
    args = dict(x_TD=case["x"], token_idx_N=case["token_idx"], weight_N=case["weight"], offsets_E=case["offsets"],
                **{k: case[k] for k in PARAMS}, activation=case["activation"])
    for k, v in args.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            args[k] = v.detach().to(torch.float32 if k == "weight_N" else dtype)
    args.update(changes)
    return dict(args=args, requires_grad=requires_grad, grad_mode=grad_mode, g=case["g"].float())


def load_copy(name: str, monkeypatch: pytest.MonkeyPatch | None = None):
    """A fresh copy of the triton_moe.py next to these tests, imported now under ``name`` (the
    installed package's copy, if any, is left alone)."""
    spec = importlib.util.spec_from_file_location(name, MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules (monkeypatch: only for the test's duration)
    if monkeypatch is None:
        sys.modules[name] = module
    else:
        monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


ARG_OF = {"x": "x_TD", "weight": "weight_N", **{k: k for k in PARAMS}}


def run_jobs(path_in: str, path_out: str) -> None:
    """The subprocess: run every job through triton_moe, forward and backward."""
    module = load_copy("_triton_moe_interpreted")
    results = {"_interpreted": module._interpreted()}
    for name, spec in torch.load(path_in).items():
        args = spec["args"]
        leaves = {g: args[a] for g, a in ARG_OF.items() if isinstance(args[a], torch.Tensor)}
        for g, t in leaves.items():
            t.requires_grad_(g in spec["requires_grad"])
        try:
            with torch.set_grad_enabled(spec["grad_mode"]):
                out = module.triton_moe(**args)
        except ValueError as e:
            results[name] = {"error": str(e)}
            continue
        if out.requires_grad:
            out.backward(spec["g"])
        results[name] = {"out": out.detach(), "grads": {g: t.grad for g, t in leaves.items() if t.grad is not None}}
    torch.save(results, path_out)


# ----------------------------------------------------------------------------- the runs


FP32 = {f"{a}-{'bias' if b else 'no_bias'}": make_case(a, b) for a in ACTIVATIONS for b in (True, False)}
LOW = {  # bf16 (8-bit mantissa) and fp16 round h and g inside; tolerances against fp64
    "bf16-gelu": (make_case("gelu", True, seed=1, dtype=torch.bfloat16), torch.bfloat16, 2e-2),
    "fp16-swiglu": (make_case("swiglu", True, seed=2, dtype=torch.float16), torch.float16, 3e-3),
}
PARTIAL = {"router_only": ("weight",), "down_only": ("w2", "b2"), "input_only": ("x",)}
PARTIAL_CASE = make_case("gelu_tanh", True, seed=3)
EMPTY_CASE = make_case("relu", True, counts=(0,) * E, pad=3)
BAD_CASE = FP32["gelu-bias"]
BAD_INPUTS = {  # name: (expected message, argument changes)
    "activation": ("activation='silu'; choose one of", dict(activation="silu")),
    "offsets_dtype": ("offsets_E must be torch.int32", dict(offsets_E=BAD_CASE["offsets"].long())),
    "weight_dtype": ("weight_N must be torch.float32", dict(weight_N=BAD_CASE["weight"].detach())),
    "w3_without_swiglu": ("w3 must be None", dict(w3=BAD_CASE["w1"].detach().float())),
    "w2_shape": ("w2 must have shape", dict(w2=BAD_CASE["w2"].detach().float()[:, :-1])),
    "x_width": ("x_TD must have shape", dict(x_TD=BAD_CASE["x"].detach().float()[:, :-1])),
    "b2_missing": ("b2 must have shape", dict(b2=None)),
    "weight_length": ("weight_N must have shape", dict(weight_N=BAD_CASE["weight"].detach().float()[:-1])),
    "float64": ("take float32, float16 or bfloat16", dict(x_TD=BAD_CASE["x"].detach())),
}


@pytest.fixture(scope="module")
def kernel_results(tmp_path_factory) -> dict:
    jobs = {f"fp32-{name}": job(case, torch.float32) for name, case in FP32.items()}
    jobs |= {name: job(case, dtype) for name, (case, dtype, _) in LOW.items()}
    jobs |= {name: job(PARTIAL_CASE, torch.float32, requires_grad=wanted) for name, wanted in PARTIAL.items()}
    jobs["empty"] = job(EMPTY_CASE, torch.float32)
    jobs["inference"] = job(FP32["swiglu-bias"], torch.float32, grad_mode=False)
    jobs |= {f"bad-{name}": job(BAD_CASE, torch.float32, **change) for name, (_, change) in BAD_INPUTS.items()}
    folder = tmp_path_factory.mktemp("triton")
    path_in, path_out = str(folder / "jobs.pt"), str(folder / "results.pt")
    torch.save(jobs, path_in)
    here = Path(__file__).parent
    path = [str(here), str(here.parent)]  # this module, and tests/ for helpers
    code = f"import sys; sys.path[:0] = {path!r}; import test_triton_moe as t; t.run_jobs(*sys.argv[1:])"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code, path_in, path_out], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"the interpreter run failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    results = torch.load(path_out)
    assert results["_interpreted"], "the subprocess did not run Triton's interpreter"
    return results


def assert_near(name: str, got: torch.Tensor | None, want: torch.Tensor, tol: float) -> None:
    """Max abs error within ``tol`` of the reference's largest magnitude."""
    assert got is not None, f"{name}: no gradient"
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, want {tuple(want.shape)}"
    err = (got.double() - want).abs().max().item()
    scale = max(want.abs().max().item(), 1e-3)
    assert err <= tol * scale, f"{name}: max error {err:.3g} against scale {scale:.3g}"


def assert_matches(result: dict, case: dict, tol: float) -> None:
    assert "error" not in result, result.get("error")
    want_out, want = reference(case)
    assert result["out"].dtype == torch.float32
    assert_near("out", result["out"], want_out, tol)
    assert set(result["grads"]) == set(want), "gradients missing or extra"
    for name, grad in want.items():
        assert_near(f"d{name}", result["grads"][name], grad, tol)


# ----------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("name", FP32)
def test_fp32_matches_float64_loop(kernel_results, name):
    case, result = FP32[name], kernel_results[f"fp32-{name}"]
    assert_matches(result, case, 1e-5)
    grads = result["grads"]
    assert grads["weight"].dtype == torch.float32 and grads["x"].dtype == torch.float32
    assert not grads["weight"][sum(COUNTS):].any(), "padding rows got a gradient"
    for t in NO_EXPERT:  # exact zeros: nothing was added there
        assert not result["out"][t].any() and not grads["x"][t].any()
    for name in PARAMS:  # expert 0 has no rows
        if case[name] is not None:
            assert not grads[name][0].any(), f"the idle expert got a nonzero d{name}"


@pytest.mark.parametrize("name", LOW)
def test_low_precision_matches_float64_loop(kernel_results, name):
    case, dtype, tol = LOW[name]
    result = kernel_results[name]
    assert_matches(result, case, tol)
    assert result["grads"]["x"].dtype == dtype and result["grads"]["w1"].dtype == dtype
    assert not result["grads"]["weight"][sum(COUNTS):].any()


@pytest.mark.parametrize("name", PARTIAL)
def test_only_wanted_gradients(kernel_results, name):
    """Only the gradients asked for come back (the other kernels are skipped), and they are right."""
    result = kernel_results[name]
    _, want = reference(PARTIAL_CASE)
    assert set(result["grads"]) == set(PARTIAL[name])
    for g in PARTIAL[name]:
        assert_near(f"d{g}", result["grads"][g], want[g], 1e-5)


def test_no_pairs_only_padding(kernel_results):
    """Every expert idle, three padding rows: zero output and exactly zero gradients."""
    result = kernel_results["empty"]
    assert not result["out"].any()
    assert set(result["grads"]) == {k for k in GRADS if EMPTY_CASE[k] is not None}
    for name, grad in result["grads"].items():
        assert not grad.any(), f"d{name} is not zero"


def test_inference_matches_training(kernel_results):
    """Without gradients nothing is saved for backward (SAVE=False); the output is the same."""
    inference, training = kernel_results["inference"], kernel_results["fp32-swiglu-bias"]
    assert inference["grads"] == {}
    torch.testing.assert_close(inference["out"], training["out"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_inputs_raise(kernel_results, name):
    message, _ = BAD_INPUTS[name]
    assert message in kernel_results[f"bad-{name}"].get("error", "no ValueError")


# ----------------------------------------------------------------------------- availability


def test_cpu_without_interpreter_points_to_fused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    module = load_copy("_triton_moe_compiled", monkeypatch)
    x = torch.zeros(2, 4)
    assert "backend='fused'" in module.triton_problem(x)
    with pytest.raises(ValueError, match="backend='fused'"):
        module.triton_moe(x, None, None, None, None, None, None, None, None, None, "gelu")


def test_module_imports_without_triton(monkeypatch):
    """Importing the module never needs triton; asking for the kernels names the extra."""
    for name in [m for m in sys.modules if m == "triton" or m.startswith("triton.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    module = load_copy("_triton_moe_without_triton", monkeypatch)
    assert "pip install 'xmoe[triton]'" in module.triton_problem(torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"pip install 'xmoe\[triton\]'"):
        module.triton_moe(torch.zeros(2, 4), None, None, None, None, None, None, None, None, None, "gelu")


# ----------------------------------------------------------------------------- the real compiler

TRITON_TYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64", torch.int32: "i32"}
KERNELS = {"_up_kernel", "_down_kernel", "_hidden_grad_kernel", "_down_weight_kernel", "_up_weight_kernel",
           "_input_grad_kernel"}


@pytest.mark.slow
def test_kernels_compile_for_hopper(monkeypatch, tmp_path):
    """No GPU needed: every kernel a bf16 SwiGLU forward+backward with biases launches (all the
    gated and bias branches) goes through Triton's real compiler to an sm_90 (H100/H200) cubin,
    with the GPU block sizes and the argument specialisation a launch would see (pointers and
    multiples of 16 marked divisible by 16, ints equal to 1 made constants)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is the default
    module = load_copy("_triton_moe_for_hopper", monkeypatch)
    compiled = {}

    def compile_instead(kernel, num_programs, blocks, device, **args):
        signature, constants, attrs = {}, {}, {}
        for i, param in enumerate(kernel.params):
            value = args[param.name]
            if param.is_constexpr or value is None or (type(value) is int and value == 1):
                signature[param.name], constants[param.name] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                signature[param.name], attrs[(i,)] = "*" + TRITON_TYPE[value.dtype], [["tt.divisibility", 16]]
            else:
                signature[param.name] = "i32"
                if value % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        source = ASTSource(kernel, signature, constants, attrs)
        options = dict(num_warps=blocks.num_warps, num_stages=blocks.num_stages)
        compiled[kernel.__name__] = compile(source, target=GPUTarget("cuda", 90, 32), options=options)

    monkeypatch.setattr(module, "_launch", compile_instead)
    monkeypatch.setattr(module, "triton_problem", lambda x: None)  # CPU tensors stand in for CUDA ones
    T_, D_, F_, E_ = 64, 768, 384, 4  # S1's widths

    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.bfloat16).requires_grad_()

    out = module.triton_moe(
        leaf(T_, D_), torch.arange(T_), torch.rand(T_).requires_grad_(), torch.full((E_,), T_, dtype=torch.int32),
        leaf(E_, D_, F_), leaf(E_, F_), leaf(E_, F_, D_), leaf(E_, D_), leaf(E_, D_, F_), leaf(E_, F_), "swiglu",
    )
    out.sum().backward()
    assert set(compiled) == KERNELS
    for name, kernel in compiled.items():
        assert kernel.asm.get("cubin"), f"{name}: no cubin"


# ----------------------------------------------------------------------------- on a GPU


def gelu_experts64(x, token_idx, weight, counts, w1, b1, w2, b2):
    """The float64 reference at GPU-test sizes: one GEMM chain per expert, pairs summed per token."""
    out, start = x.new_zeros(x.shape), 0
    for e, count in enumerate(counts):
        rows = token_idx[start : start + count]
        y = oracle.gelu(x[rows] @ w1[e] + b1[e]) @ w2[e] + b2[e]
        out = out.index_add(0, rows, weight[start : start + count, None] * y)
        start += count
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float32, 1e-4)], ids=["bf16", "fp32"])
def test_cuda_matches_float64_without_host_sync(monkeypatch, dtype, tol):
    """Compiled kernels on a GPU: output and gradients against float64, forward and backward under
    torch's sync debug mode set to raise, and the forward captured in a CUDA graph and replayed."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    triton_moe = load_copy("_triton_moe_cuda", monkeypatch).triton_moe

    gen = torch.Generator().manual_seed(0)
    T_, D_, F_, E_, pad = 512, 256, 128, 16, 7
    counts = torch.randint(0, 90, (E_,), generator=gen).tolist()
    counts[3], counts[5] = 0, 1
    token_idx = torch.cat([torch.randperm(T_, generator=gen)[:c].sort().values for c in counts]
                          + [torch.randint(0, T_, (pad,), generator=gen)])
    weight = torch.cat([torch.rand(sum(counts), generator=gen), torch.full((pad,), 7.0)]).double()
    shapes = {"x": (T_, D_), "w1": (E_, D_, F_), "b1": (E_, F_), "w2": (E_, F_, D_), "b2": (E_, D_)}
    scales = {"x": 1.0, "w1": D_**-0.5, "b1": 0.5, "w2": F_**-0.5, "b2": 0.5}
    leaves64 = {k: (scales[k] * torch.randn(*s, generator=gen, dtype=torch.float64)).to(dtype).double().requires_grad_()
                for k, s in shapes.items()}
    leaves64["weight"] = weight.float().double().requires_grad_()
    g = torch.randn(T_, D_, generator=gen, dtype=torch.float64)
    want_out = gelu_experts64(leaves64["x"], token_idx, leaves64["weight"], counts,
                              *(leaves64[k] for k in ("w1", "b1", "w2", "b2")))
    want = dict(zip(leaves64, torch.autograd.grad(want_out, list(leaves64.values()), g)))

    cuda = {k: v.detach().to("cuda", torch.float32 if k == "weight" else dtype).requires_grad_() for k, v in leaves64.items()}
    index, offsets = token_idx.cuda(), torch.tensor(counts).cumsum(0).to("cuda", torch.int32)

    def run():
        return triton_moe(cuda["x"], index, cuda["weight"], offsets, cuda["w1"], cuda["b1"], cuda["w2"], cuda["b2"],
                          None, None, "gelu")

    g_cuda = g.float().cuda()  # copied before the check: a copy from the host syncs
    run().backward(g_cuda)  # compiles the kernels (outside the check too)
    for t in cuda.values():
        t.grad = None
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = run()
        out.backward(g_cuda)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_near("out", out.cpu(), want_out.detach(), tol)
    for k, grad in want.items():
        assert_near(f"d{k}", cuda[k].grad.cpu(), grad, tol)
    assert not cuda["weight"].grad[sum(counts):].any()

    with torch.no_grad():
        run()  # the inference variant compiles before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = run()
    graph.replay()
    torch.cuda.synchronize()
    assert_near("graph out", captured.cpu(), want_out.detach(), tol)
