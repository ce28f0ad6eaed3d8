"""fastprune under ``torch.compile(fullgraph=True)``, ``torch.export`` and CUDA graphs.

On CPU (CI): a small random-init timm ViT patched by :func:`fastprune.patch.timm` compiles with
``fullgraph=True`` (any graph break raises) into one graph and gives eager's logits, token sizes and
position maps; gradients agree in training mode; ``torch.export`` succeeds and the exported program
matches eager. The MSTM Triton operators (``torch.ops.fastprune.mstm_*_triton``) compile, export and
pass ``torch.library.opcheck`` (run by the Triton interpreter, where they are opaque custom ops), and a
subprocess without the interpreter checks that their ``triton_op`` form hands the Triton kernels
themselves to the compiler, and that torch's analysis of the tensors a kernel writes finds only each
registered kernel's outputs (an input it counts as written is cloned before every compiled launch).
With a GPU, the same model compiles with Inductor on CUDA, is captured in a CUDA graph and exports.

Methods covered: every method registered with :mod:`fastprune.patch` (``merge``, ``tome``, ``idle``,
``evit`` and ``bat`` when this was written; a newly registered method is picked up by :data:`METHODS`
automatically, with the options of :data:`METHOD_CONFIGS` or a 0.7 keep rate), except those listed in
:data:`NOT_YET_COVERED` with the reason (none today). On the GPU only ``merge`` runs wrapped Triton
operators; the other methods' kernels are launched raw (Dynamo traces raw launches too, but that is
checked only by the CUDA tests, which CI cannot run).

Compile times on two busy cores are long, so the model is tiny (32 px images, 8 px patches: 17
tokens, width 64, depth 3), most CPU runs use the ``eager``/``aot_eager`` backends (Dynamo and AOT
autograd, the parts that must not break) and one runs Inductor's C++ backend (depth 2).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch._dynamo.testing
from timm.models.vision_transformer import VisionTransformer

import fastprune
import fastprune.patch as fp
from fastprune import _ext
from fastprune.kernels import aot
from conftest import DEVICE

#: Options given to ``fastprune.patch.timm`` per method (the model has 17 tokens and 3 blocks).
METHOD_CONFIGS = {
    "merge": dict(r=2),                                   # MSTM, 2 tokens fewer per block
    "tome": dict(r=2),                                    # ToMe bipartite matching
    "idle": dict(r=0.5),                                  # IdleViT keep rate: every block idles tokens
    "evit": dict(r=0.7, layers=(1, 2)),                   # EViT keep rate at blocks 1 and 2
    "bat": dict(r=0.7, layers=(1, 2)),                    # BAT keep rate at blocks 1 and 2
}
#: Methods whose patched model does not compile yet, and why. Their compile test is a strict xfail
#: (it fails once the method compiles: then delete the entry); training and export tests are skipped.
NOT_YET_COVERED: dict = {}
#: Every registered method; unknown ones get a keep rate.
METHODS = sorted(set(fp.available_methods()) | set(METHOD_CONFIGS))


def _covered(methods):
    """``methods`` as parameters, those in :data:`NOT_YET_COVERED` skipped with the reason."""
    return [pytest.param(m, marks=pytest.mark.skip(reason=f"not yet covered: {NOT_YET_COVERED[m]}"))
            if m in NOT_YET_COVERED else m for m in methods]


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles fresh models: start from an empty Dynamo cache (no recompile limit hit)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _vit(depth: int = 3, embed_dim: int = 64, device: str = "cpu") -> VisionTransformer:
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=embed_dim, depth=depth, num_heads=2,
                             num_classes=10).to(device).eval()


def _patched(method: str, depth: int = 3, embed_dim: int = 64, device: str = "cpu", **options):
    model = _vit(depth, embed_dim, device)
    config = dict(METHOD_CONFIGS.get(method, dict(r=0.7)), **options)
    return fp.timm(model, method=method, **config)


def _images(batch: int = 2, device: str = "cpu") -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, device=device)


def _state(model):
    """The per-forward state a patched forward leaves behind: token counts, sizes, position map."""
    st = fp.state(model)
    return st.num_tokens, st.size.clone(), st.index.clone()


def _assert_same_state(got, want):
    assert got[0] == want[0]
    torch.testing.assert_close(got[1], want[1])
    torch.testing.assert_close(got[2], want[2], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# The patched model on CPU
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", [
    pytest.param(m, marks=pytest.mark.xfail(strict=True, reason=f"not yet covered: {NOT_YET_COVERED[m]}",
                                            raises=(torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError)))
    if m in NOT_YET_COVERED else m for m in METHODS])
def test_fullgraph_one_graph_same_logits(method):
    """fullgraph=True raises on any graph break; the counting backend sees exactly one graph."""
    model = _patched(method)
    x = _images()
    with torch.no_grad():
        want = model(x)
    want_state = _state(model)
    if method != "idle":  # the token count really drops (idle keeps every token, by design)
        assert want_state[0][-1] < want_state[0][0]

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        got = compiled(x)
    assert counter.frame_count == 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    _assert_same_state(_state(model), want_state)  # Python side effects (the state) are replayed

    with torch.no_grad():  # a second call with new images reuses the graph
        x2 = _images()
        torch.testing.assert_close(compiled(x2), model(x2), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1


@pytest.mark.parametrize("method", _covered(METHODS))
def test_compiled_training_step_matches_eager(method):
    """Training mode under fullgraph compile: same loss and parameter gradients as eager (IdleViT:
    the mask form, with its token cut loss added as in training)."""
    model = _patched(method).train()
    x = _images()
    target = torch.tensor([1, 7])

    def loss_fn(m):
        loss = torch.nn.functional.cross_entropy(m(x), target)
        if method == "idle":
            loss = loss + fastprune.idle.CUT_LOSS_WEIGHT * fastprune.idle.cut_loss(model)
        return loss

    def grads(m):
        model.zero_grad(set_to_none=True)
        loss = loss_fn(m)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want_loss, want = grads(model)
    got_loss, got = grads(torch.compile(model, backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    assert got.keys() == want.keys() and len(want) > 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", _covered(METHODS))
def test_export_matches_eager(method):
    model = _patched(method)
    x = _images()
    with torch.no_grad():
        want = model(x)
        exported = torch.export.export(model, (x,))
        got = exported.module()(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the exported program stands alone: it gives eager's answer on other images too
    x2 = _images()
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x2), model(x2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", [
    "reference", "triton",
    pytest.param("cpp", marks=pytest.mark.skipif(not _ext.available(), reason="C++ extension not built"))])
def test_merge_backends_compile_and_export(backend):
    """The patched model with each CPU merge backend: the PyTorch reference, the Triton operators
    (interpreted on CPU) and the C++ operator (what "auto" picks on CPU when it is built)."""
    model = _patched("merge", backend=backend)
    x = _images()
    with torch.no_grad():
        want = model(x)
        want_state = _state(model)
        got = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
        _assert_same_state(_state(model), want_state)
        exported = torch.export.export(model, (x,))
        torch.testing.assert_close(exported.module()(x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    targets = {n.target for n in exported.graph.nodes if n.op == "call_function"}
    if backend == "triton":
        assert torch.ops.fastprune.mstm_weighted_merge_triton.default in targets
    elif backend == "cpp":
        assert torch.ops.fastprune.mstm_merge.default in targets


def test_export_dynamic_batch():
    """The batch size can stay symbolic: token counts depend on N only."""
    model = _patched("merge")
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():
        exported = torch.export.export(model, (_images(2),), dynamic_shapes=({0: batch},))
        for b in (1, 3):
            x = _images(b)
            torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_inductor_cpu_fullgraph():
    """One Inductor (C++) compile of a patched model: same logits, sizes and position map as eager."""
    model = _patched("merge", depth=2, embed_dim=32)
    x = _images()
    with torch.no_grad():
        want = model(x)
        want_state = _state(model)
        got = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    _assert_same_state(_state(model), want_state)


# --------------------------------------------------------------------------------------------------
# The MSTM Triton operators (run by the interpreter on CPU)
# --------------------------------------------------------------------------------------------------

def _merge_inputs(device=DEVICE):
    x = torch.randn(2, 13, 24, device=device, requires_grad=True)
    attn = torch.rand(2, 13, device=device, requires_grad=True)
    size = (torch.rand(2, 13, device=device) + 0.5).requires_grad_()
    return x, attn, size


def _triton_merge(x, attn, size):
    m = fastprune.merge_tokens(x, attn, 4, size=size, weight="size_attn", backend="triton")
    return m.x, m.size, m.index


def test_triton_merge_compiles_with_autograd():
    """The Triton merge under fullgraph compile (AOT autograd traces the registered backward)."""
    inputs = _merge_inputs()
    want = _triton_merge(*inputs)
    (want[0].square().sum() + want[1].sum()).backward()
    want_grads = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    got = torch.compile(_triton_merge, backend=counter, fullgraph=True)(*inputs)
    (got[0].square().sum() + got[1].sum()).backward()
    assert counter.frame_count == 1
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    for t, w in zip(inputs, want_grads):
        torch.testing.assert_close(t.grad, w, rtol=1e-6, atol=1e-6)
    # and the kernels agree with the PyTorch reference (the specification)
    ref = fastprune.merge_tokens(*[t.detach() for t in inputs[:2]], 4, size=inputs[2].detach(),
                                 weight="size_attn", backend="reference")
    torch.testing.assert_close(got[0].detach(), ref.x, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[2], ref.index)


def test_triton_merge_exports_as_two_operators():
    class Merge(torch.nn.Module):
        def forward(self, x, attn, size):
            return _triton_merge(x, attn, size)

    inputs = [t.detach() for t in _merge_inputs()]
    with torch.no_grad():
        exported = torch.export.export(Merge(), tuple(inputs))
        got = exported.module()(*inputs)
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert torch.ops.fastprune.mstm_select_match_triton.default in targets
    assert torch.ops.fastprune.mstm_weighted_merge_triton.default in targets
    for g, w in zip(got, _triton_merge(*inputs)):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_triton_operators_opcheck():
    """Schema, fake kernels (static and dynamic shapes) and autograd registration of the operators."""
    import fastprune.kernels.merge  # noqa: F401  (registers the operators, also when this test runs alone)
    x, attn, size = (t.detach() for t in _merge_inputs())
    index = torch.ops.fastprune.mstm_select_match_triton(attn, x, 4, 1)
    torch.library.opcheck(torch.ops.fastprune.mstm_select_match_triton, (attn, x, 4, 1))
    for s, size_attn in ((size, True), (None, False)):
        args = (x.clone().requires_grad_(), attn.clone().requires_grad_(),
                None if s is None else s.clone().requires_grad_(), index, 4, size_attn)
        torch.library.opcheck(torch.ops.fastprune.mstm_weighted_merge_triton, args)
    out, _, wsum = torch.ops.fastprune.mstm_weighted_merge_triton(x, attn, size, index, 4, True)
    for flags in ((True, True, True), (False, True, False)):
        torch.library.opcheck(torch.ops.fastprune.mstm_weighted_merge_triton_backward,
                              (torch.randn_like(out), torch.randn_like(wsum), x, out, index, wsum, attn, size, True,
                               *flags))


#: Start of the child processes below: compiled (not interpreted) kernels and, without a GPU, a
#: Triton driver that only names a target, which is all torch needs to generate the kernels' TTIR
#: (its analysis of the arguments a kernel writes). Only the child's driver is replaced. A child
#: prints ``SKIP <reason>`` where this torch or Triton lacks what it needs.
_COMPILE_ONLY_PRELUDE = textwrap.dedent("""
    import os, sys
    os.environ.pop("TRITON_INTERPRET", None)
    import torch, triton
    try:
        from triton.backends.compiler import GPUTarget
    except ImportError as err:
        print("SKIP", f"triton {triton.__version__}: {err}")
        sys.exit(0)

    if not torch.cuda.is_available():
        class _CompileOnlyDriver:
            def get_current_target(self):
                return GPUTarget("cuda", 90, 32)
            def get_active_torch_device(self):
                return torch.device("cpu")
            def is_active(self):
                return True
        if hasattr(triton.runtime.driver, "set_active"):
            triton.runtime.driver.set_active(_CompileOnlyDriver())
        else:
            triton.runtime.driver._active = _CompileOnlyDriver()
""")


def _run_compile_only(script: str) -> list[str]:
    """The output lines of ``script`` run after :data:`_COMPILE_ONLY_PRELUDE` in a child Python without
    the interpreter; the test is skipped where the child says ``SKIP``."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", _COMPILE_ONLY_PRELUDE + script], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    skip = [line for line in lines if line.startswith("SKIP ")]
    if skip:
        pytest.skip(skip[0][len("SKIP "):])
    return lines


_TRITON_OP_PROBE = textwrap.dedent("""
    from torch._functorch.aot_autograd import aot_function
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from fastprune.kernels import merge as merge_kernels

    assert merge_kernels._define_op is torch.library.triton_op
    graphs = []

    class Traced(Exception):
        pass

    def compiler(gm, example_inputs):
        graphs.append(gm)
        def never(*args):
            raise Traced
        return never

    def merge(x, scores, size):
        index = torch.ops.fastprune.mstm_select_match_triton(scores, x, 4, 1)
        out, size_out, _ = torch.ops.fastprune.mstm_weighted_merge_triton(x, scores, size, index, 4, True)
        return out, size_out

    def backward(g, gs, x, out, index, wsum, scores, size):
        return torch.ops.fastprune.mstm_weighted_merge_triton_backward(
            g, gs, x, out, index, wsum, scores, size, True, False, True, False)

    x, s, z = torch.randn(2, 13, 24), torch.rand(2, 13), torch.rand(2, 13) + 0.5
    index = torch.randint(0, 9, (2, 13))
    for fn, args in ((merge, (x, s, z)),
                     (backward, (torch.randn(2, 9, 24), torch.randn(2, 9), x, torch.randn(2, 9, 24), index,
                                 torch.rand(2, 9) + 1, s, z))):
        try:
            aot_function(fn, fw_compiler=compiler)(*args)
        except Traced:
            pass
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
                kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
                name = getattr(kernel, "fn", kernel).__name__
                print("KERNEL", name, sorted(node.kwargs["tensors_to_clone"]))
""")


def test_triton_op_form_hands_the_kernels_to_the_compiler():
    """Without the interpreter the operators are ``triton_op`` s: AOT autograd (what Inductor consumes)
    sees the Triton launches themselves, and they write only the operators' own outputs."""
    launches = [line.split(" ", 2)[1:] for line in _run_compile_only(_TRITON_OP_PROBE) if line.startswith("KERNEL ")]
    assert launches == [
        ["_mstm_select_match_kernel", "['plan_ptr']"],  # not the scores (test_kernels_write_only_their_outputs)
        ["_weighted_merge_kernel", "['out_ptr', 'size_out_ptr', 'wsum_ptr']"],
        ["_weighted_merge_backward_kernel", "['grad_scores_ptr']"],  # only the gradient asked for
    ]


def _outputs(always=(), **when):
    """The arguments a launch writes: ``always``, and each keyword's argument when the launch's
    constexpr flag it names is set."""
    return lambda consts: sorted({*always, *(arg for arg, flag in when.items() if consts[flag])})


#: The tensors each kernel really writes (its outputs; ToMe's general path also its scratch rows), by kernel, as a
#: function of the launch's constexprs. The operators' kernels (``wrap_triton``: MSTM's) and the
#: raw launches alike: Dynamo hands both to the same analysis.
KERNEL_OUTPUTS = {
    "_mstm_select_match_kernel": _outputs(["plan_ptr"]),
    "_weighted_merge_kernel": _outputs(["out_ptr", "size_out_ptr", "wsum_ptr"]),
    "_weighted_merge_backward_kernel": _outputs(grad_x_ptr="NEED_GX", grad_scores_ptr="NEED_GSCORES",
                                                grad_size_ptr="NEED_GSIZE"),
    "_select_topk_kernel": _outputs(["slot_ptr"], kept_ptr="WRITE_KEPT", rest_ptr="WRITE_REST"),
    "_cosine_match_kernel": _outputs(["best_ptr", "partner_ptr"], map_ptr="WRITE_MAP"),
    # the scratch rows only on the general path (more than 257 tokens); the one-tile chain stays in registers
    "_tome_match_select_kernel": lambda consts: sorted(["plan_ptr"] + ([] if consts["ONE_TILE"]
                                                                        else ["score_ptr", "partner_ptr"])),
    "_bat_match_kernel": _outputs(["index_ptr"]),
    "_bat_cluster_kernel": _outputs(["index_ptr"]),
    "_cls_logit_kernel": _outputs(["out_ptr"]),
    "_gather_rows_kernel": _outputs(["dst_ptr"]),
    "_scatter_rows_kernel": _outputs(["out_ptr"]),
    "_cut_loss_fwd_kernel": _outputs(["inter_ptr", "intra_ptr", "lse_ptr"]),
    "_cut_loss_bwd_kernel": _outputs(["dt_ptr"]),
}

_WRITES_PROBE = textwrap.dedent("""
    import json, logging
    from torch._higher_order_ops import triton_kernel_wrap
    from fastprune.kernels import aot

    if hasattr(triton_kernel_wrap, "identify_accessed_tensors"):  # torch 2.14
        def written_by(kernel, args):
            accesses = triton_kernel_wrap.identify_accessed_tensors(kernel, args, {})
            return [dep.name for dep in accesses.read_writes.writes]
    elif hasattr(triton_kernel_wrap, "identify_mutated_tensors"):  # torch 2.11
        def written_by(kernel, args):
            return list(triton_kernel_wrap.identify_mutated_tensors(kernel, args, {}))
    else:
        print("SKIP", f"torch {torch.__version__} has no TTIR write analysis")
        sys.exit(0)

    DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "i64": torch.int64,
              "i32": torch.int32}

    def launch_args(spec):
        args = dict(spec.constexprs)
        for name, ty in spec.signature.items():
            args[name] = (torch.empty(16, dtype=DTYPES[ty[1:]]) if ty.startswith("*")
                          else 2.0 if ty.startswith("fp") else 16)
        return args

    specs = aot.registered_specs(jit_specialized=False)
    try:  # a torch or Triton whose API differs (the analysis itself would only log the error)
        triton_kernel_wrap.generate_ttir(specs[0].kernel, launch_args(specs[0]), {})
        written_by(specs[0].kernel, launch_args(specs[0]))
    except Exception as err:
        print("SKIP", f"torch {torch.__version__}, triton {triton.__version__}: {type(err).__name__}: {err}")
        sys.exit(0)

    class Failures(logging.Handler):  # the analysis logs its failures (and then says every tensor is written)
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []
        def emit(self, record):
            self.messages.append(record.getMessage())

    failures = Failures()
    logging.getLogger(triton_kernel_wrap.__name__).addHandler(failures)
    written = {}
    for spec in specs:
        args = launch_args(spec)
        names = [name for name in written_by(spec.kernel, args) if isinstance(args.get(name), torch.Tensor)]
        written[spec.name] = "analysis failed: " + "; ".join(failures.messages) if failures.messages else sorted(names)
        failures.messages.clear()
    print("WRITES", json.dumps(written))
""")


def test_kernels_write_only_their_outputs():
    """torch's analysis of the tensors a Triton kernel writes (``identify_accessed_tensors``, in torch
    2.11 ``identify_mutated_tensors``, on the TTIR before inlining) finds exactly each kernel's outputs,
    for every launch configuration of the ahead-of-time registry: under ``torch.compile`` each
    argument it counts as written is cloned before every launch (functionalization). It follows a
    store's address back through every operation but loads, and a device function's result to all of
    its arguments, so an address computed from ``topk_row(scores, ...)`` counted the scores as
    written; kernels/select.py's ``write_selection`` (and the matching's map) take their addresses
    from values read back from memory instead. Without a GPU the child generates TTIR for sm_90."""
    lines = _run_compile_only(_WRITES_PROBE)
    written = json.loads(next(line for line in lines if line.startswith("WRITES "))[len("WRITES "):])
    specs = aot.registered_specs(jit_specialized=False)
    assert sorted(written) == sorted(spec.name for spec in specs)
    wrong = {}
    for spec in specs:
        kernel = getattr(spec.kernel, "fn", spec.kernel).__name__
        assert kernel in KERNEL_OUTPUTS, f"{kernel} ({spec.name}): add the arguments it writes to KERNEL_OUTPUTS"
        want = KERNEL_OUTPUTS[kernel](spec.constexprs)
        if written[spec.name] != want:
            wrong[spec.name] = f"writes {written[spec.name]}, want {want}"
    assert not wrong, "\n".join(f"{name}: {why}" for name, why in wrong.items())


# --------------------------------------------------------------------------------------------------
# GPU: Inductor with the Triton kernels, CUDA graphs, export
# --------------------------------------------------------------------------------------------------

@requires_cuda
@pytest.mark.parametrize("method", _covered(METHODS))
def test_cuda_inductor_fullgraph(method):
    from torch._inductor.utils import run_and_get_code

    model = _patched(method, device="cuda")
    x = _images(4, "cuda")
    with torch.no_grad():
        want = model(x)
        want_state = _state(model)
        got, code = run_and_get_code(torch.compile(model, fullgraph=True), x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    _assert_same_state(_state(model), want_state)
    if method == "merge":  # Inductor launches fastprune's kernels itself (triton_op), not an opaque op
        source = "\n".join(code)
        assert "_mstm_select_match_kernel" in source and "_weighted_merge_kernel" in source


@requires_cuda
@pytest.mark.parametrize("method", _covered(METHODS))
def test_cuda_graph_capture_and_replay(method):
    """The eager patched model is captured in a CUDA graph (no host synchronisation) and replays the
    right answer for new images."""
    model = _patched(method, device="cuda")
    static_x = _images(4, "cuda")
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                model(static_x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = model(static_x)
        for _ in range(2):
            x = _images(4, "cuda")
            static_x.copy_(x)
            graph.replay()
            torch.testing.assert_close(static_out, model(x), rtol=1e-5, atol=1e-5)


@requires_cuda
def test_cuda_reduce_overhead_mode():
    """torch.compile's CUDA-graph mode ("reduce-overhead") on the merged model."""
    model = _patched("merge", device="cuda")
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for _ in range(3):
            x = _images(4, "cuda")
            torch.testing.assert_close(compiled(x).clone(), model(x), rtol=1e-4, atol=1e-4)


@requires_cuda
@pytest.mark.parametrize("method", _covered(METHODS))
def test_cuda_export(method):
    model = _patched(method, device="cuda")
    x = _images(4, "cuda")
    with torch.no_grad():
        exported = torch.export.export(model, (x,))
        torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-5, atol=1e-5)
    if method == "merge":
        targets = {n.target for n in exported.graph.nodes if n.op == "call_function"}
        assert torch.ops.fastprune.mstm_weighted_merge_triton.default in targets
