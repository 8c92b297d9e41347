"""The compiled CPU kernels (mskt/fast/csrc/cpu_kernels.cpp) compute the same function as the plain path.

- the compiled attention (training, with dropout) against autograd through the explicit steps with the
  kernel's own dropout factors: outputs and the gradients of inputs, source and every weight, on
  fresh random shapes, padding and head widths (the specialised ones and one read at run time);
- its dropout factors ARE the model's masks (``mskt.model.layers.dropout_mask``), bit for bit, on
  fresh random shapes, keys and sample indices, and they have dropout's law: rate, exact inverse
  keep rate, no correlation between neighbours (keys, rows, samples), a function of the key only;
- the compiled dropout (``COMPILED_KERNELS.dropout``): rate, scale, gradient, and bitwise the Python
  dropout with the same key; relu-dropout likewise; the LayerNorm kernel (which the stack node's
  norms compute) against torch's, values and gradients;
- independent transformer stacks of an accelerated model (``mskt.fast.accelerate``: the compiled
  stack node, side by side on two threads, or one at a time) against the same stacks on torch's
  operations: outputs and every gradient, cross-modal and self-attention, all steps and the last
  step only, on fresh random shapes, padding and layer counts, without dropout and with it (the
  same masks, from one dropout context); with dropout, bitwise the same on one thread and on two;
- an accelerated model's evaluation predictions and gradients are the same as the plain model's;
- a machine where the kernels cannot be built trains on torch's operations, with one warning.

Where they cannot be built (no compiler) these tests are skipped, unless ``MSKT_REQUIRE_KERNELS=1``
(``.ci/run`` sets it): then a failed build fails the suite, so CI always runs them.
"""

from __future__ import annotations

import logging
import math
import os

import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from mskt.config import Config
from mskt.errors import ConfigError
from mskt.fast import accelerate, accelerated_stacks, kernels
from mskt.fast.kernels import COMPILED_KERNELS
from mskt.model import TORCH_KERNELS, Attention, Transformer, build_model, key_mask, run_stacks
from mskt.model.layers import DropoutContext, DropoutKey, call_key, dropout, dropout_key, dropout_mask, relu_dropout, set_dropout_context

try:
    from conftest import NO_DROPOUT, make_batch_fn, tiny_model_config
except ImportError:  # tests/ imported as a package
    from tests.conftest import NO_DROPOUT, make_batch_fn, tiny_model_config

REQUIRED = os.environ.get("MSKT_REQUIRE_KERNELS") == "1"
pytestmark = pytest.mark.skipif(kernels.compiled_kernels() is None and not REQUIRED, reason="the compiled kernels do not build here")


def test_the_kernels_build():
    assert kernels.compiled_kernels() is not None


def test_a_new_process_in_another_checkout_imports_the_built_kernels_without_torchs_loader(tmp_path):
    """Once built (and stamped with the source's digest), a process imports the library directly:
    torch's loader, which costs ~2 s per process, is never called. The process runs a second copy
    of the package from another folder: the build is the machine's (one cache, keyed by CPU and
    source digest), so the copy neither rebuilds nor leaves a build/ folder."""
    import shutil
    import subprocess
    import sys

    from mskt.fast.build import kernel_build_dir

    assert kernels.compiled_kernels() is not None
    checkout = tmp_path / "second-checkout"
    shutil.copytree(Path(kernels.__file__).parents[1], checkout / "mskt", ignore=shutil.ignore_patterns("__pycache__"))
    code = (
        "import torch.utils.cpp_extension as ext\n"
        "def refuse(*a, **k): raise AssertionError('torch loader called')\n"
        "ext.load = refuse\n"
        "import mskt\n"
        f"assert mskt.__file__.startswith({str(checkout)!r}), mskt.__file__\n"
        "from mskt.fast.build import compiled_kernels\n"
        "import torch\n"
        "out, lse = compiled_kernels().forward(torch.randn(1, 2, 6), torch.randn(1, 3, 12), torch.zeros(1, 3), 1, 0.5, 0.0, 0, torch.zeros(0, dtype=torch.long))\n"
        "assert out.shape == (1, 2, 6)\n"
        "print(compiled_kernels().__file__)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    env.pop("MSKT_HOME", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=checkout, env=env)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).parent == kernel_build_dir()
    assert not (checkout / "build").exists()


# A process that asks for the kernels with an empty cache (tests/test_kernels.py's test below).
# Each one marks when it has looked for a finished build and found none; the build (torch's loader,
# or a copy of this machine's build in its place) starts only once both have looked, so the other is
# then sure to be past that look, and only the lock can keep it from building too.
FIRST_USE = """
import os, shutil, sys, time
from pathlib import Path
import torch
import torch.utils.cpp_extension as ext
from mskt.fast import build

folder, mode, prebuilt = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
looked = build._built
def marking_built(library, stamp, digest):
    done = looked(library, stamp, digest)
    (folder / f"looked-{os.getpid()}").touch()
    return done
build._built = marking_built

real_load = ext.load
def load(name, sources, build_directory, **kwargs):
    with open(folder / "builds", "a") as f:
        f.write(f"{os.getpid()}\\n")
    deadline = time.monotonic() + 120
    while len(list(folder.glob("looked-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)  # the other process, past its look, now waits on the lock
    if mode == "real":
        return real_load(name, sources, build_directory=build_directory, **kwargs)
    library = Path(build_directory) / f"{name}.so"
    shutil.copyfile(prebuilt, library)
    return build._import_library(name, library)
ext.load = load

while not (folder / "go").exists():
    time.sleep(0.01)
kernels = build.compiled_kernels()
out, lse = kernels.forward(torch.randn(1, 2, 6), torch.randn(1, 3, 12), torch.zeros(1, 3), 1, 0.5, 0.0, 0, torch.zeros(0, dtype=torch.long))
assert out.shape == (1, 2, 6)
print(kernels.__file__)
"""


@pytest.mark.parametrize("mode", ["copied", pytest.param("real", marks=pytest.mark.skipif(
    os.environ.get("MSKT_TEST_REAL_BUILD") != "1", reason="a real build takes minutes (257 s on a busy 2-core machine); MSKT_TEST_REAL_BUILD=1 runs it"))])
def test_two_processes_that_first_use_the_kernels_at_once_build_them_once(tmp_path, mode):
    """Two processes ask for the kernels at the same moment with an empty $MSKT_KERNEL_CACHE: both
    get them, one builds, the other waits on the build folder's lock and imports that build. The
    build is a copy of this machine's library in torch's loader's place ("copied", a second), or
    torch's loader compiling the source ("real", minutes, so only with MSKT_TEST_REAL_BUILD=1)."""
    import subprocess
    import sys

    from mskt.fast.build import _source_digest

    prebuilt = kernels.compiled_kernels().__file__
    cache = tmp_path / "cache"
    env = {**os.environ, "MSKT_KERNEL_CACHE": str(cache), "PYTHONPATH": str(Path(kernels.__file__).parents[2]), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", FIRST_USE, str(tmp_path), mode, prebuilt], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    (tmp_path / "go").touch()
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    assert len((tmp_path / "builds").read_text().split()) == 1  # one build; the other process waited for it
    (folder,) = cache.iterdir()
    assert {Path(out.strip()) for out, _ in results} == {folder / f"{folder.name}.so"}
    assert (folder / "source.sha1").read_text() == _source_digest()


def fresh_generator():
    seed = int(np.random.SeedSequence().entropy % 2**31)
    return torch.Generator().manual_seed(seed), seed


def random_key(g, batch):
    """A dropout key with a random 64-bit call key and random sample indices (some above 2**32)."""
    call = int(torch.randint(-(2**63), 2**63 - 1, (1,), generator=g))
    samples = torch.randint(0, 2**40, (batch,), generator=g)
    samples[: batch // 2] %= 5000  # dataset-sized indices too
    return DropoutKey(call, samples)


def python_factors(shape, p, key):
    """The model's dropout factors (0 or the inverse keep rate) for a tensor of ``shape``."""
    keep, scale = dropout_mask(shape, p, key)
    return keep * scale


def with_compiled_kernels(module):
    """``module`` with the compiled kernel functions in place of torch's, as ``accelerate`` hands
    them to a verified model (the layers' own code runs, the kernels under it change)."""
    for m in module.modules():
        if getattr(m, "kernels", None) is TORCH_KERNELS:
            m.kernels = COMPILED_KERNELS
    assert all(getattr(m, "kernels", COMPILED_KERNELS) is COMPILED_KERNELS for m in module.modules())
    return module


def assert_runs_compiled(model):
    """Every transformer stack of ``model`` runs as the compiled node (accelerate verified it), so a
    comparison with the plain model compares two implementations, not the Python code with itself."""
    found = accelerated_stacks(model)
    assert found and all(v is True for v in found.values()), {k: v for k, v in found.items() if v is not True}
    assert all(m.kernels is COMPILED_KERNELS for m in model.modules() if hasattr(m, "kernels"))


def explicit_attention(attn, x, source, mask, factors):
    """softmax(q k^T / sqrt(dh), padded keys masked) times the dropout factors, times v: autograd
    through every step."""
    B, T, d = x.shape
    S, h = source.shape[1], attn.heads
    dh = d // h
    q = attn.q(x).view(B, T, h, dh).transpose(1, 2)  # (B, h, T, dh)
    k, v = attn.kv(source).view(B, S, 2, h, dh).permute(2, 0, 3, 1, 4)  # each (B, h, S, dh)
    weights = (q @ k.transpose(-2, -1) / math.sqrt(dh)).masked_fill(~mask[:, None, None, :], -math.inf).softmax(-1)
    y = (weights * factors) @ v  # (B, h, T, dh)
    return attn.out(y.transpose(1, 2).reshape(B, T, d))


@pytest.mark.parametrize("d,heads", [(30, 5), (24, 2), (14, 2), (40, 4)])  # head widths 6, 12, 7 (run-time width), 10
@pytest.mark.parametrize("repeat", range(3))
def test_fused_attention_with_dropout_equals_the_explicit_steps_with_its_mask(d, heads, repeat):
    g, seed = fresh_generator()
    B, T, S = (int(torch.randint(1, n, (1,), generator=g)) for n in (5, 40, 60))
    x, source = torch.randn(B, T, d, generator=g), torch.randn(B, S, d, generator=g)
    lengths = torch.randint(0, S + 1, (B,), generator=g)
    mask = key_mask(lengths, S)
    p = float(torch.empty(1).uniform_(0.05, 0.6, generator=g))
    attn = with_compiled_kernels(Attention(d, heads, dropout=p)).train()
    set_dropout_context(attn, DropoutContext(seed, 3, random_key(g, B).samples))
    weight = torch.randn(B, T, d, generator=g)

    xs, src = x.clone().requires_grad_(), source.clone().requires_grad_()
    fused, none = attn(xs, src, mask)
    fused_grads = torch.autograd.grad((fused * weight).sum(), [xs, src, *attn.parameters()])
    assert none is None
    # The model's own mask for this site: (B, h, T, S), row head * T + t of each sample.
    factors = python_factors((B, heads, T, S), p, dropout_key(attn, "weights", p, x))
    xs, src = x.clone().requires_grad_(), source.clone().requires_grad_()
    plain = explicit_attention(attn, xs, src, mask, factors)
    plain_grads = torch.autograd.grad((plain * weight).sum(), [xs, src, *attn.parameters()])

    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5, msg=f"seed {seed}")
    for name, a, b in zip(["x", "source", *dict(attn.named_parameters())], fused_grads, plain_grads):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=f"gradient of {name}, seed {seed}")


def test_fused_attention_does_not_depend_on_the_thread_count():
    """Each (batch, head) is one task whose rows run in order: outputs and gradients are bitwise
    the same on any number of threads, so a seeded run repeats on any machine with the kernels."""
    torch.manual_seed(0)
    attn = with_compiled_kernels(Attention(30, 5, dropout=0.1)).train()
    x, source = torch.randn(6, 40, 30), torch.randn(6, 70, 30)
    mask = key_mask(torch.tensor([70, 3, 50, 1, 70, 22]), 70)
    threads, results = torch.get_num_threads(), []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            xs = x.clone().requires_grad_()
            torch.manual_seed(1)
            out, _ = attn(xs, source, mask)
            results.append((out, *torch.autograd.grad(out.square().sum(), [xs, *attn.parameters()])))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_fused_attention_checks_its_inputs():
    ext = kernels.compiled_kernels()
    q, kv, bias = torch.randn(2, 3, 12), torch.randn(2, 5, 24), torch.zeros(2, 5)
    with pytest.raises(RuntimeError, match="do not match"):
        ext.forward(q, kv[:, :4].contiguous(), bias, 3, 0.5, 0.0, 0, torch.arange(2))
    with pytest.raises(RuntimeError, match="not a multiple"):
        ext.forward(q, kv, bias, 5, 0.5, 0.0, 0, torch.arange(2))
    with pytest.raises(RuntimeError, match="float32"):
        ext.forward(q.double(), kv, bias, 3, 0.5, 0.0, 0, torch.arange(2))
    with pytest.raises(RuntimeError, match="samples"):
        ext.forward(q, kv, bias, 3, 0.5, 0.1, 0, torch.arange(3))  # one sample index per batch row


@pytest.mark.parametrize("repeat", range(4))
def test_the_compiled_masks_are_the_models_masks(repeat):
    """One definition: the kernels' factors for a (B, R, C) tensor equal ``dropout_mask``'s (times
    its scale) exactly, for any key, sample indices (any size) and rate."""
    g, seed = fresh_generator()
    B, R, C = (int(torch.randint(1, n, (1,), generator=g)) for n in (6, 40, 70))
    p = float(torch.empty(1).uniform_(0.01, 0.95, generator=g))
    key = random_key(g, B)
    compiled = kernels.compiled_kernels().dropout_factors(R, C, p, key.call, key.samples)
    assert torch.equal(compiled, python_factors((B, R, C), p, key)), f"seed {seed}"
    # The same rows read as (B, R1, R2, C) by the model: the same factors (middle dims flatten).
    assert torch.equal(python_factors((B, 1, R, C), p, key).view(B, R, C), compiled)


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5])
def test_kernel_dropout_factors_have_dropouts_law(p):
    ext = kernels.compiled_kernels()
    samples = torch.arange(40)
    factors = ext.dropout_factors(50, 500, p, 123, samples)  # (40 samples, 50 rows, 500 columns): one million
    kept = factors != 0
    n = factors.numel()
    rate = 1 - kept.float().mean().item()
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / n)
    threshold = round(p * 2**32)
    torch.testing.assert_close(factors[kept], torch.full((int(kept.sum()),), 2**32 / (2**32 - threshold)))
    # Neighbours along columns, rows and consecutive sample indices are uncorrelated.
    z = kept.float() - kept.float().mean()
    for a, b in ((z[..., 1:], z[..., :-1]), (z[:, 1:], z[:, :-1]), (z[1:], z[:-1])):
        corr = (a * b).mean() / z.var()
        assert abs(corr) < 5 / math.sqrt(n), corr
    # A function of the key only: the same key, the same factors; a sample's rows do not depend on
    # its place in the batch; another call key or step, other factors.
    assert torch.equal(ext.dropout_factors(50, 500, p, 123, samples), factors)
    assert torch.equal(ext.dropout_factors(50, 500, p, 123, samples.flip(0)), factors.flip(0))
    assert not torch.equal(ext.dropout_factors(50, 500, p, 124, samples), factors)
    other_step = ext.dropout_factors(50, 500, p, call_key(7, 2, 99), samples)
    assert not torch.equal(ext.dropout_factors(50, 500, p, call_key(7, 1, 99), samples), other_step)


@pytest.mark.parametrize("p", [0.1, 0.25, 0.9])
def test_fused_dropout_has_the_right_rate_scale_and_gradient(p):
    shape = (3, 1001, 133)  # rows of 133: not a multiple of any vector width
    n = math.prod(shape)
    x = torch.ones(shape, requires_grad=True)
    y = COMPILED_KERNELS.dropout(x, p, DropoutKey(call_key(1, 2, 3), torch.arange(3)))
    kept = y != 0
    rate = 1 - kept.float().mean().item()
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / n)
    threshold = round(p * 2**32)
    assert torch.allclose(y[kept], torch.tensor(2**32 / (2**32 - threshold)))
    weight = torch.arange(n, dtype=torch.float32).view(shape)
    y.backward(weight)
    torch.testing.assert_close(x.grad, y.detach() * weight)  # the same factors, recomputed


@pytest.mark.parametrize("shape", [(3, 50, 40), (5, 17), (2, 3, 4, 129)])
def test_fused_dropout_is_the_python_dropout_bitwise(shape):
    """The compiled dropout and relu-dropout and the model's, with one key: the same values and the
    same gradients, bitwise (the same factors, one float multiply each)."""
    g, seed = fresh_generator()
    x = torch.randn(shape, generator=g)
    key = random_key(g, shape[0])
    for compiled, plain in ((COMPILED_KERNELS.dropout, dropout), (COMPILED_KERNELS.relu_dropout, relu_dropout)):
        outs = []
        for fn in (compiled, plain):
            xs = x.clone().requires_grad_()
            y = fn(xs, 0.3, key)
            (grad,) = torch.autograd.grad((y * x).sum(), xs)
            outs.append((y, grad))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1]), f"{fn.__name__}, seed {seed}"
    assert COMPILED_KERNELS.dropout(x, 0.3, None) is x  # no key: no dropout (evaluation)


def test_without_a_context_masks_are_fresh_per_call_and_repeat_by_torchs_seed():
    """Outside the training loop (no dropout context) each call takes a fresh seed from torch's
    generator: a forward in training mode still drops, and a seeded one repeats."""
    layer = with_compiled_kernels(Transformer(12, 3, 1, 0.3, 0.3, 0.3, 0.3)).train()
    x, mask = torch.randn(3, 50, 12), torch.ones(3, 50, dtype=torch.bool)
    torch.manual_seed(5)
    a, _ = layer(x, mask)
    b, _ = layer(x, mask)
    torch.manual_seed(5)
    assert torch.equal(layer(x, mask)[0], a)
    assert not torch.equal(a, b)


def compiled_layer_norm(norm, x):
    """``norm(x)`` by the compiled LayerNorm kernel (the one the stack node's norms compute)."""
    return kernels.compiled_kernels().layer_norm_autograd(x, norm.weight, norm.bias, norm.eps)


@pytest.mark.parametrize("width", [30, 60, 7, 120])
def test_fused_layer_norm_equals_torchs(width):
    g, seed = fresh_generator()
    shape = (int(torch.randint(1, 30, (1,), generator=g)), int(torch.randint(1, 600, (1,), generator=g)), width)
    fused, plain = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
    with torch.no_grad():
        fused.weight.normal_(generator=g), fused.bias.normal_(generator=g)
    plain.load_state_dict(fused.state_dict())
    x = (3 * torch.randn(shape, generator=g) + 1).requires_grad_()
    weight = torch.randn(shape, generator=g)
    outs = [compiled_layer_norm(fused, x), plain(x)]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5, msg=f"seed {seed}")
    grads = [torch.autograd.grad((out * weight).sum(), [x, norm.weight, norm.bias]) for out, norm in zip(outs, (fused, plain))]
    # The weight and bias gradients are fp32 sums over up to 17k rows, in different orders: their
    # tolerance scales with their size (seed 570831584: 3e-4 apart at 309, each 1e-4 from float64).
    for name, a, b in zip(["x", "weight", "bias"], *grads):
        torch.testing.assert_close(a, b, atol=1e-5 * (1 + b.abs().max().item()), rtol=1e-4, msg=f"gradient of {name}, seed {seed}")


def test_fused_layer_norm_gradients_do_not_depend_on_the_thread_count():
    x = torch.randn(40, 300, 30, requires_grad=True)
    norm = torch.nn.LayerNorm(30)
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            grads.append(torch.autograd.grad(compiled_layer_norm(norm, x).square().sum(), [x, norm.weight, norm.bias]))
    finally:
        torch.set_num_threads(threads)
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            assert torch.equal(a, b)


def random_stacks(g, compiled, d, heads, count, dropout=0.0):
    """``count`` stacks of 1 to 3 layers, cross-modal or not at random, and their calls on fresh
    random shapes and padding: (stacks, calls). Weights are not the initial ones (LayerNorm's
    would hide mistakes). ``compiled``: each stack is accelerated (``mskt.fast.accelerate``) and
    verified to run as the compiled node."""
    B = int(torch.randint(1, 5, (1,), generator=g))
    stacks, calls = [], []
    for _ in range(count):
        cross = bool(torch.randint(0, 2, (1,), generator=g))
        layers = int(torch.randint(1, 4, (1,), generator=g))
        T, S = (int(torch.randint(1, n, (1,), generator=g)) for n in (30, 40))
        stack = Transformer(d, heads, layers, dropout, dropout, dropout, dropout, cross=cross).train()
        with torch.no_grad():
            for p in stack.parameters():
                p.normal_(std=0.5, generator=g)
        if compiled:
            assert_runs_compiled(accelerate(stack))
        x, source = torch.randn(B, T, d, generator=g), torch.randn(B, S, d, generator=g)
        mask = key_mask(torch.randint(0, T + 1, (B,), generator=g), T)
        source_mask = key_mask(torch.randint(0, S + 1, (B,), generator=g), S)
        stacks.append(stack)
        calls.append((x, mask, source, source_mask) if cross else (x, mask, None, None))
    return stacks, calls


def stacks_with_gradients(stacks, calls, weights, last_only):
    """run_stacks on fresh leaf copies of the inputs: outputs, then the gradients of (output *
    weight).sum() for x, each source and every parameter, stack by stack."""
    leaves = [[None if t is None or t.dtype == torch.bool else t.clone().requires_grad_() for t in call] for call in calls]
    runs = [(stack, leaf[0], call[1], leaf[2], call[3]) for stack, leaf, call in zip(stacks, leaves, calls)]
    outs = [y for y, _ in run_stacks(runs, last_only=last_only)]
    inputs = [t for leaf in leaves for t in (leaf[0], leaf[2]) if t is not None] + [p for s in stacks for p in s.parameters()]
    loss = sum((y * w).sum() for y, w in zip(outs, weights))
    return [*outs, *torch.autograd.grad(loss, inputs)]


@pytest.mark.parametrize("d,heads", [(30, 5), (12, 3), (14, 2)])
@pytest.mark.parametrize("last_only", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_compiled_stacks_equal_the_stacks_on_torch_ops(d, heads, last_only, threads, p):
    """Several independent stacks as the compiled node (side by side on two threads when they
    balance, one at a time otherwise) against each stack's layers on torch's operations, in
    training mode, without dropout and with it (each stack under one dropout context: the same
    masks on both paths): the same outputs and the same gradients of every x, every source and
    every weight.

    One fixed draw per parameter set, not a fresh one per run: the stacks are piecewise smooth
    (ReLU), and at a random point a pre-activation can fall within rounding of 0, where the two
    paths' float32 sums land on different sides of the kink and a gradient differs by that unit's
    whole contribution. Measured at seed 674908802 (d 14, 2 heads, p 0.3): the compiled path agreed
    with the Python code run in float64 to 7e-7, the Python float32 path differed by 0.065 in one
    input gradient, and a central finite difference gave the mean of the two one-sided values."""
    seed = zlib.crc32(f"{d}-{heads}-{last_only}-{threads}-{p}".encode())
    g = torch.Generator().manual_seed(seed)
    count = int(torch.randint(1, 7, (1,), generator=g))
    fused, calls = random_stacks(g, True, d, heads, count, dropout=p)
    plain = [Transformer(d, heads, len(s.layers), p, p, p, p, cross=s.layers[0].norm_source is not None)
             for s in fused]
    context = DropoutContext(seed, 1, random_key(g, calls[0][0].shape[0]).samples)
    for i, (a, b, call) in enumerate(zip(plain, fused, calls)):
        a.load_state_dict(b.state_dict())
        a.train()
        for stack in (a, b):  # sites named as in a model, one stack apart from the next
            set_dropout_context(stack, context)
            for name, m in stack.named_modules():
                m.dropout_site = f"stack{i}.{name}"
        assert a.accelerator is None and a.kernels is TORCH_KERNELS  # the plain stack: its Python code
        assert b.accelerator.takes(b, call[0])  # the accelerated one: the compiled node takes this call
    weights = [torch.randn(c[0].shape[0], 1 if last_only else c[0].shape[1], d, generator=g) for c in calls]
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        results = [stacks_with_gradients(stacks, calls, weights, last_only) for stacks in (fused, plain)]
    finally:
        torch.set_num_threads(previous)
    # float32 sums in other orders: errors relative to the largest gradient (the keys' bias has a
    # gradient of exactly 0 in exact arithmetic, left as rounding noise of the terms that cancel).
    scale = max(float(b.abs().max()) for b in results[1][count:])
    for i, (a, b) in enumerate(zip(*results)):
        torch.testing.assert_close(a, b, atol=1e-4 * scale, rtol=1e-4, msg=f"tensor {i} of {len(results[0])}, seed {seed}")


def test_compiled_stacks_do_not_depend_on_the_thread_count():
    """With dropout and one torch seed, four equal stacks side by side on two threads and one at a
    time on one thread draw the same masks and give the same outputs and gradients, bitwise: each
    stack's kernels and products run in the same order on either schedule."""
    g, _ = fresh_generator()
    stacks, calls = random_stacks(g, True, 12, 3, 1, dropout=0.2)
    copies = [Transformer(12, 3, len(stacks[0].layers), 0.2, 0.2, 0.2, 0.2, cross=calls[0][2] is not None).train() for _ in range(3)]
    for c in copies:
        c.load_state_dict(stacks[0].state_dict())
        assert_runs_compiled(accelerate(c))
    stacks, calls = stacks + copies, calls * 4
    weights = [torch.randn(calls[0][0].shape, generator=g)] * 4
    previous, results = torch.get_num_threads(), []
    try:
        for n in (2, 1):
            torch.set_num_threads(n)
            torch.manual_seed(3)
            results.append(stacks_with_gradients(stacks, calls, weights, last_only=False))
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_the_compiled_bias_gradient_sums_each_column_in_a_fixed_order():
    g, seed = fresh_generator()
    x = torch.randn(int(torch.randint(1, 3000, (1,), generator=g)), int(torch.randint(1, 300, (1,), generator=g)), generator=g)
    ext = kernels.compiled_kernels()
    torch.testing.assert_close(ext.column_sums(x), x.double().sum(0).float(), atol=1e-4, rtol=1e-5, msg=f"seed {seed}")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ext.column_sums(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, ext.column_sums(x))


@pytest.mark.parametrize("variant", ["full", "kt"])
def test_model_predictions_are_the_same_with_compiled_kernels_and_torch_ops(variant):
    """Evaluation has no dropout: the accelerated model (compiled kernels and stack nodes) and the
    plain one compute the same function on the same weights."""
    torch.manual_seed(0)
    fused = accelerate(build_model(tiny_model_config(variant=variant))).eval()
    plain = build_model(tiny_model_config(variant=variant)).eval()
    plain.load_state_dict(fused.state_dict())
    assert_runs_compiled(fused)
    assert all(v == "not accelerated" for v in accelerated_stacks(plain).values())
    batch = make_batch_fn(tiny_model_config(variant=variant), batch=6, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(fused(batch).pred, plain(batch).pred, atol=1e-5, rtol=1e-5)


def test_training_step_gradients_are_the_same_without_dropout():
    torch.manual_seed(0)
    cfgs = [tiny_model_config(variant="full", **NO_DROPOUT) for _ in range(2)]
    fused, plain = accelerate(build_model(cfgs[0])).train(), build_model(cfgs[1]).train()
    plain.load_state_dict(fused.state_dict())
    assert_runs_compiled(fused)
    batch = make_batch_fn(cfgs[0], batch=6, seed=4)
    grads = []
    for model in (fused, plain):
        model.loss(model(batch), batch["labels"])["total"].backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=2e-5, rtol=1e-4, msg=name)


def test_a_machine_without_the_kernels_trains_on_torch_ops(monkeypatch, caplog, tmp_path):
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    monkeypatch.setenv("MSKT_KERNEL_CACHE", str(tmp_path))  # a machine with no build in its kernel cache
    kernels.compiled_kernels.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="mskt.fast.build"):
            assert kernels.compiled_kernels() is None
            torch.manual_seed(0)
            model = accelerate(build_model(tiny_model_config(variant="full"))).train()
            batch = make_batch_fn(tiny_model_config(variant="full"), batch=4, seed=1)
            model.loss(model(batch), batch["labels"])["total"].backward()
            # Handed the compiled kernel functions anyway, each falls back to torch's operations per call.
            handed = with_compiled_kernels(build_model(tiny_model_config(variant="full"))).train()
            handed.loss(handed(batch), batch["labels"])["total"].backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        assert all(p.grad is not None for p in handed.parameters() if p.requires_grad)
        # accelerate left the model's Python code in place: torch's kernel functions, no stack accelerated.
        assert all(m.kernels is TORCH_KERNELS for m in model.modules() if hasattr(m, "kernels"))
        assert all(v == "not accelerated" for v in accelerated_stacks(model).values())
        unavailable = [r.getMessage() for r in caplog.records if r.name == "mskt.fast.build" and "not available" in r.getMessage()]
        assert len(unavailable) == 1 and "Ninja is required" in unavailable[0]  # once, however many layers asked
    finally:
        kernels.compiled_kernels.cache_clear()  # the next caller loads the real build again


def test_cpu_kernels_is_a_checked_choice():
    """A run's choice (train() and load_run() accelerate the model when "fused"), not the model's:
    the model's config has no such field."""
    import dataclasses

    from mskt.model import ModelConfig

    assert Config().cpu_kernels == "fused"
    assert "cpu_kernels" in Config.fields() and "cpu_kernels" not in {f.name for f in dataclasses.fields(ModelConfig)}
    with pytest.raises(ConfigError, match="cpu_kernels"):
        Config.from_dict({"cpu_kernels": "cuda"})
