"""Every fast path computes the same function as the plain one, on fresh random inputs.

- fused attention (the compiled CPU kernel ``mskt.fast`` hands a module, and torch's SDPA) against the explicit
  softmax(QK^T/sqrt(d) + mask) V, values and every gradient, with and without dropout;
- the compiled dropout against dropout's definition, and the fallback when the kernels cannot build;
- the hashed dropout against dropout's definition (rate, scale, gradient, a function of its key:
  seed, step, site, sample and position, not of the batch a sample is in);
- attention dropout on the explicit path against the same mask applied by hand;
- the training attention with dropout (``DropoutAttention``: its own backward) against the
  explicit path with the same mask, values and every gradient;
- the memory transformer's last-step-only last layer against the full computation, plain and accelerated;
- fused Adam over one flat tensor (FlatAdam) against torch's reference Adam over the separate tensors;
- torch.compile against eager, and the eager fallback when compiling fails;
- whole-tensor batching against a reference per-sample loader (torch DataLoader + collate).
"""

from __future__ import annotations

import math
import resource
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mskt.config import Config
from mskt.errors import ConfigError
from mskt.data.presets import MODALITIES
from mskt.fast import accelerate, accelerated_stacks, compiled_kernels
from mskt.fast.kernels import COMPILED_KERNELS
from mskt.train.optim import FlatAdam
from mskt.train.runtime import CompiledOrEager, autocast, keep_freed_memory
from mskt.model import TORCH_KERNELS, Attention, Transformer, build_model, dropout, dropout_mask, key_mask
from mskt.model.layers import DropoutContext, DropoutKey, call_key, dropout_key, set_dropout_context
from mskt.train import Tensors, make_optimizer, training_step

try:
    from conftest import NO_DROPOUT, TINY, make_batch_fn, tiny_model_config, tiny_run_config
except ImportError:  # tests/ imported as a package
    from tests.conftest import NO_DROPOUT, TINY, make_batch_fn, tiny_model_config, tiny_run_config


def fresh_generator():
    """A generator seeded from the OS: each run of the suite draws new inputs."""
    seed = int(np.random.SeedSequence().entropy % 2**31)
    return torch.Generator().manual_seed(seed), seed


def attention_module(d, heads, dropout, kernels):
    """An Attention module; ``kernels="fused"``: with the compiled kernel functions (what
    ``mskt.fast.accelerate`` hands a verified model's modules), "torch": its stock ones."""
    attn = Attention(d, heads, dropout=dropout)
    assert attn.kernels is TORCH_KERNELS
    if kernels == "fused":
        attn.kernels = COMPILED_KERNELS
    return attn


def accelerated(module, kernels):
    """``module`` as is ("torch"), or accelerated ("fused"; where the kernels build, every stack
    verified to run as the compiled node)."""
    if kernels == "fused":
        accelerate(module)
        if compiled_kernels() is not None:
            assert all(v is True for v in accelerated_stacks(module).values()), accelerated_stacks(module)
    return module


def random_attention_inputs(g, d=12, heads=3):
    B = int(torch.randint(1, 6, (1,), generator=g))
    T = int(torch.randint(1, 30, (1,), generator=g))
    S = int(torch.randint(1, 40, (1,), generator=g))
    x = torch.randn(B, T, d, generator=g)
    source = torch.randn(B, S, d, generator=g)
    lengths = torch.randint(0, S + 1, (B,), generator=g)  # 0 included: key_mask keeps one step
    lengths[0] = S
    return x, source, key_mask(lengths, S)


@pytest.mark.parametrize("kernels", ["fused", "torch"])
@pytest.mark.parametrize("repeat", range(5))
def test_fused_attention_equals_explicit_attention(repeat, kernels):
    g, seed = fresh_generator()
    x, source, mask = random_attention_inputs(g)
    attn = attention_module(12, 3, 0.0, kernels)
    fused, none = attn(x, source, mask)
    explicit, weights = attn(x, source, mask, return_attention=True)
    assert none is None
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5, msg=f"seed {seed}")
    # And both equal attention written out from its definition.
    B, T, d = x.shape
    q = attn.q(x).view(B, T, 3, 4).transpose(1, 2)
    k, v = attn.kv(source).view(B, -1, 2, 3, 4).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-2, -1) / math.sqrt(4)
    reference = scores.masked_fill(~mask[:, None, None, :], -math.inf).softmax(-1)
    torch.testing.assert_close(weights, reference, atol=1e-6, rtol=1e-5, msg=f"seed {seed}")


@pytest.mark.parametrize("kernels", ["fused", "torch"])
def test_fused_attention_gradients_equal_explicit_ones(kernels):
    g, seed = fresh_generator()
    x, source, mask = random_attention_inputs(g)
    attn = attention_module(12, 3, 0.0, kernels)
    grads = []
    for explicit in (False, True):
        xs = x.clone().requires_grad_()
        out, _ = attn(xs, source, mask, return_attention=explicit)
        (out * torch.arange(out.numel()).view_as(out).sin()).sum().backward()
        grads.append(xs.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4, msg=f"seed {seed}")


# ----------------------------------------------------------------------------------------------
# Dropout


def test_dropout_is_the_identity_when_not_training_or_p_is_zero():
    x = torch.randn(4, 5, 6)
    assert dropout(x, 0.3, None) is x
    assert dropout(x, 0.0, DropoutKey(1, torch.arange(4))) is x
    layer = Transformer(6, 2, 1, 0.3, 0.3, 0.3, 0.3).eval()
    assert dropout_key(layer, "embed", 0.3, x) is None  # evaluation: no key, so no dropout
    assert dropout_key(layer.train(), "embed", 0.0, x) is None


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5, 0.9])
def test_hashed_dropout_has_the_right_rate_scale_and_gradient(p):
    shape = (4, 1000, 100)
    n = math.prod(shape)
    x = torch.ones(shape, requires_grad=True)
    y = dropout(x, p, DropoutKey(call_key(11, 0, 5), torch.arange(4)))
    kept = y != 0
    rate = 1 - kept.float().mean().item()
    assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / n)  # five binomial standard errors
    effective = round(p * 2**32) / 2**32
    assert abs(effective - p) <= 2**-33
    assert torch.allclose(y[kept], torch.tensor(1 / (1 - effective)))  # the exact inverse keep rate
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())  # d(x * keep * scale)/dx = keep * scale


def test_hashed_dropout_is_a_function_of_its_key():
    """The mask of a row depends on (seed, step, site, sample index, position) only: a sample keeps
    its mask in another batch at another place; another seed, step, site or sample changes it."""
    x = torch.randn(3, 50, 40)
    samples = torch.tensor([7, 123456, 2**35 + 1])
    key = lambda seed=1, step=0, site=9, s=samples: DropoutKey(call_key(seed, step, site), s)  # noqa: E731
    a = dropout(x, 0.3, key())
    assert torch.equal(dropout(x, 0.3, key()), a)
    # The same three samples in another batch of five, at other rows.
    bigger = torch.randn(5, 50, 40)
    bigger[[4, 0, 2]] = x
    b = dropout(bigger, 0.3, key(s=torch.tensor([123456, 99, 2**35 + 1, 5, 7])))
    assert torch.equal(b[[4, 0, 2]], a)
    for other in (key(seed=2), key(step=1), key(site=10), key(s=samples + 1)):
        assert not torch.equal(dropout(x, 0.3, other), a)


def test_dropout_sites_of_a_model_draw_independent_masks():
    """Under one context, each dropout of each module gets its own key: the stack's embedding, each
    layer's residuals and relu; the same module path and step give the same key again."""
    stack = Transformer(8, 2, 2, 0.3, 0.3, 0.3, 0.3).train()
    set_dropout_context(stack, DropoutContext(3, 1, torch.arange(4)))
    x = torch.randn(4, 6, 8)
    sites = [(stack, "embed"), *[(m, tag) for layer in stack.layers
                                 for m, tag in ((layer.attn, "weights"), (layer, "attention_residual"), (layer, "relu"),
                                                (layer, "feed_forward_residual"))]]
    keys = [dropout_key(m, tag, 0.3, x).call for m, tag in sites]
    assert len(set(keys)) == len(keys)
    assert keys == [dropout_key(m, tag, 0.3, x).call for m, tag in sites]
    set_dropout_context(stack, DropoutContext(3, 2, torch.arange(4)))
    assert not set(keys) & {dropout_key(m, tag, 0.3, x).call for m, tag in sites}


def test_hashed_dropout_rounds_a_bfloat16_product_once():
    """Under bf16 autocast the kept values are x * scale rounded once, not x times a rounded scale."""
    x = torch.randn(2, 100, 64).bfloat16()
    key = DropoutKey(call_key(1, 1, 1), torch.arange(2))
    y = dropout(x, 0.1, key)
    keep, scale = dropout_mask(x.shape, 0.1, key)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, (x.float() * keep * scale).bfloat16())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_draws_the_cpu_masks():
    """One definition on every device: CUDA computes the same bits with the same torch operations."""
    key = DropoutKey(call_key(4, 5, 6), torch.tensor([3, 2**33, 17]))
    cpu, scale = dropout_mask((3, 7, 200), 0.2, key)
    cuda, cuda_scale = dropout_mask((3, 7, 200), 0.2, DropoutKey(key.call, key.samples.cuda()))
    assert scale == cuda_scale and torch.equal(cuda.cpu(), cpu)


def test_attention_dropout_applies_one_mask_to_the_weights():
    g, seed = fresh_generator()
    x, source, mask = random_attention_inputs(g)
    attn = attention_module(12, 3, 0.2, "torch").train()
    set_dropout_context(attn, DropoutContext(seed, 0, torch.arange(x.shape[0]) * 3))
    out, _ = attn(x, source, mask)
    # By hand: the same weights, the model's mask for this site, dropout's scale.
    key = dropout_key(attn, "weights", 0.2, x)
    attn.eval()
    _, weights = attn(x, source, mask, return_attention=True)
    keep, scale = dropout_mask(weights.shape, 0.2, key)
    B, T, d = x.shape
    v = attn.kv(source).view(B, -1, 2, 3, 4).permute(2, 0, 3, 1, 4)[1]
    y = (weights * keep * scale) @ v
    torch.testing.assert_close(out, attn.out(y.transpose(1, 2).reshape(B, T, d)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("repeat", range(4))
def test_cpu_dropout_attention_equals_the_explicit_path_with_the_same_mask(repeat):
    """Training on CPU with attention dropout takes DropoutAttention (hand-written backward, mask
    bias inside the GEMM); return_attention=True takes autograd through the explicit steps. With
    the same dropout context both use the same mask: equal outputs and equal gradients for the
    inputs, the source and every weight, padded keys included."""
    g, seed = fresh_generator()
    x, source, mask = random_attention_inputs(g)
    p = float(torch.empty(1).uniform_(0.05, 0.6, generator=g))
    attn = attention_module(12, 3, p, "torch").train()
    set_dropout_context(attn, DropoutContext(seed, 0, torch.arange(x.shape[0])))
    weight = torch.randn(x.shape[0], x.shape[1], 12, generator=g)
    results = []
    for explicit in (False, True):
        xs, src = x.clone().requires_grad_(), source.clone().requires_grad_()
        out, _ = attn(xs, src, mask, return_attention=explicit)
        grads = torch.autograd.grad((out * weight).sum(), [xs, src, *attn.parameters()])
        results.append((out, grads))
    (fast, fast_grads), (plain, plain_grads) = results
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5, msg=f"seed {seed}")
    for name, a, b in zip(["x", "source", *dict(attn.named_parameters())], fast_grads, plain_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=f"gradient of {name}, seed {seed}")


@pytest.mark.parametrize("kernels", ["fused", "torch"])
def test_cpu_dropout_attention_never_attends_to_padded_keys(kernels):
    """A padded key's value cannot reach the output, in training with dropout as in evaluation."""
    g, seed = fresh_generator()
    x, source, mask = random_attention_inputs(g)
    mask[0, : max(1, mask.shape[1] // 2)] = False
    mask[0, -1] = True
    attn = attention_module(12, 3, 0.3, kernels).train()
    poisoned = torch.where(mask[..., None], source, torch.full_like(source, 1e6))
    torch.manual_seed(seed)
    a, _ = attn(x, source, mask)
    torch.manual_seed(seed)
    b, _ = attn(x, poisoned, mask)
    torch.testing.assert_close(a, b, msg=f"seed {seed}")


# ----------------------------------------------------------------------------------------------
# The memory transformer's last layer on the last step only


@pytest.mark.parametrize("kernels", ["fused", "torch"])
@pytest.mark.parametrize("layers", [1, 3])
def test_last_only_equals_the_last_step_of_the_full_output(layers, kernels):
    g, seed = fresh_generator()
    stack = accelerated(Transformer(12, 3, layers, 0.0, 0.0, 0.0, 0.0), kernels).eval()
    x, _, _ = random_attention_inputs(g)
    lengths = torch.randint(1, x.shape[1] + 1, (x.shape[0],), generator=g)
    mask = key_mask(lengths, x.shape[1])
    full, _ = stack(x, mask)
    last, _ = stack(x, mask, last_only=True)
    assert last.shape == (x.shape[0], 1, 12)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=1e-5, msg=f"seed {seed}")


@pytest.mark.parametrize("kernels", ["fused", "torch"])
@pytest.mark.parametrize("variant", ["full", "kt", "language_vision"])
def test_model_predictions_do_not_depend_on_the_last_only_shortcut(variant, kernels):
    """return_attention=True computes every memory step (for the maps) with the Python code; the
    default path only the last one (as the compiled node, when accelerated). Both predict the same."""
    cfg = tiny_model_config(variant=variant, **NO_DROPOUT)
    model = accelerated(build_model(cfg), kernels).eval()
    batch = make_batch_fn(cfg, aligned=False, seed=int(fresh_generator()[1]))
    with torch.no_grad():
        torch.testing.assert_close(model(batch).pred, model(batch, return_attention=True).pred, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Optimizer, compile, precision


def test_fused_adam_takes_the_same_steps_as_reference_adam(tiny_mosi):
    cfg = tiny_run_config(variant="full", **NO_DROPOUT, weight_decay=1e-4)
    data = Tensors.from_split(tiny_mosi["train"], "regression", torch.device("cpu"))
    batch = data.batch(torch.arange(8))
    models = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = build_model(Config.from_dict({**cfg.to_dict(), "text_dim": 300, "audio_dim": 5, "vision_dim": 20}))
        optimizer = make_optimizer(model, cfg) if fused else torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        if fused:
            assert optimizer.defaults["fused"] and isinstance(optimizer, FlatAdam)
        step = training_step(model, optimizer, cfg)
        for _ in range(5):
            step(batch)
        models.append(model)
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("variant,kt_target", [("full", "raw"), ("kt", "raw"), ("kt", "aux"), ("kt_any", "raw"), ("language_vision", "raw"), ("language", "raw"), ("vision", "raw")])
def test_every_trainable_parameter_gets_a_gradient_each_step(variant, kt_target, aligned):
    """FlatAdam's update equals torch's Adam only if no parameter is ever without a gradient."""
    options = {"kt_target": kt_target} if variant == "kt" else {}  # kt's option
    cfg = tiny_model_config(variant=variant, ctc_align=not aligned, text_steps=8 if aligned else 6, **options)
    model = build_model(cfg).train()
    batch = make_batch_fn(cfg, aligned=aligned)
    model.loss(model(batch), batch["labels"])["total"].backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def test_flat_adam_keeps_the_model_parameters_as_views_of_its_tensor():
    g, seed = fresh_generator()
    model = build_model(tiny_model_config(variant="full"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = FlatAdam([p for p in model.parameters()], lr=0.1)
    for k, v in model.state_dict().items():  # moving into the flat tensor changes no value
        torch.testing.assert_close(v, before[k], atol=0, rtol=0, msg=k)
    batch = make_batch_fn(model.cfg, seed=seed)
    optimizer.zero_grad()
    model.loss(model(batch), batch["labels"])["total"].backward()
    flat_grad = optimizer.collect_gradients()
    assert flat_grad.shape == (sum(p.numel() for p in model.parameters()),)
    torch.testing.assert_close(flat_grad, torch.cat([p.grad.reshape(-1) for p in model.parameters()]), atol=0, rtol=0)
    optimizer.step()
    # The update reached the model, through the views, and loading a state dict writes into them.
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.equal(after, optimizer.flat.detach())
    changed = after != torch.cat([before[n].reshape(-1) for n, _ in model.named_parameters()])
    assert changed[flat_grad.abs() > 1e-6].all() and not changed[flat_grad == 0].any()  # Adam's first step: ~lr * sign(g)
    model.load_state_dict(before)
    torch.testing.assert_close(optimizer.flat.detach(), torch.cat([before[n].reshape(-1) for n, _ in model.named_parameters()]))
    # A parameter left without a gradient (none in any variant) gets zeros, not another one's.
    optimizer.zero_grad()
    assert torch.count_nonzero(optimizer.collect_gradients()) == 0


def test_compiled_forward_equals_eager():
    """torch.compile of one transformer stack (the model's repeated unit), eval mode."""
    g, seed = fresh_generator()
    stack = Transformer(8, 2, 1, 0.0, 0.0, 0.0, 0.0).eval()
    x = torch.randn(3, 7, 8, generator=g)
    mask = key_mask(torch.tensor([7, 3, 1]), 7)
    compiled = CompiledOrEager(stack)
    with torch.no_grad():
        got, _ = compiled(x, mask)
        want, _ = stack(x, mask)
    assert not compiled.failed, "torch.compile fell back to eager on this machine"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"seed {seed}")


def test_compile_failure_falls_back_to_eager(monkeypatch, caplog):
    def broken_compile(module):
        def fail(*args, **kwargs):
            raise RuntimeError("no C++ compiler")
        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    stack = Transformer(8, 2, 1, 0.0, 0.0, 0.0, 0.0).eval()
    x, mask = torch.randn(2, 5, 8), key_mask(torch.tensor([5, 2]), 5)
    wrapped = CompiledOrEager(stack)
    with caplog.at_level("WARNING"):
        out, _ = wrapped(x, mask)
    assert wrapped.failed and "no C++ compiler" in caplog.text
    torch.testing.assert_close(out, stack(x, mask)[0])


def test_bf16_is_for_cuda_only():
    cfg = tiny_run_config(precision="bf16")
    with pytest.raises(ConfigError, match="bf16"):
        autocast(cfg, torch.device("cpu"))
    with pytest.raises(ConfigError, match="precision"):
        tiny_run_config(precision="fp16")


# ----------------------------------------------------------------------------------------------
# Whole-tensor batching against a reference per-sample loader


class PerSample(torch.utils.data.Dataset):
    """What a conventional loader does: one sample at a time, from the split's numpy arrays."""

    def __init__(self, split):
        self.split = split

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        sp = self.split
        return {
            **{m: torch.from_numpy(np.asarray(sp.features[m][i])) for m in MODALITIES},
            "lengths": {m: torch.tensor(int(sp.lengths[m][i])) for m in MODALITIES},
            "labels": torch.tensor(sp.labels[i]),
        }


@pytest.mark.parametrize("dataset", ["tiny_mosi", "tiny_iemocap"])
def test_batched_data_path_equals_a_per_sample_loader(dataset, request):
    ds = request.getfixturevalue(dataset)
    split = ds["train"]
    data = Tensors.from_split(split, ds.meta.task, torch.device("cpu"))
    g, seed = fresh_generator()
    order = torch.randperm(len(split), generator=g)
    sampler = torch.utils.data.BatchSampler(order.tolist(), batch_size=5, drop_last=False)
    loader = torch.utils.data.DataLoader(PerSample(split), batch_sampler=sampler)
    starts = range(0, len(split), 5)
    for start, reference in zip(starts, loader, strict=True):
        batch = data.batch(order[start : start + 5])
        for m in MODALITIES:
            assert torch.equal(batch[m], reference[m]), (m, seed)
            assert torch.equal(batch["lengths"][m], reference["lengths"][m])
        assert torch.equal(batch["labels"], reference["labels"].to(batch["labels"].dtype))


def test_lazy_h5_training_equals_in_memory_training(tiny_mosi, tmp_path):
    """``lazy=True`` reads each batch's rows from the .h5 store (non-finite values zeroed as an
    eager read does); the run is the same as with the store loaded whole."""
    from mskt.data.readers import load_dataset
    from mskt.data.store import write_store
    from mskt.train import train

    path = write_store(tiny_mosi, tmp_path / "tiny.h5")
    cfg = tiny_run_config(variant="kt", data=str(path), epochs=2, batch_size=5)
    eager = train(cfg, save=False)
    lazy_ds = load_dataset(str(path), lazy=True)
    assert not isinstance(lazy_ds["train"].features["audio"], np.ndarray)  # really on disk
    lazy = train(cfg.replace(lazy=True), save=False, dataset=lazy_ds)
    assert lazy.metrics["test"] == eager.metrics["test"]
    lazy_ds.close()


# ----------------------------------------------------------------------------------------------
# The CPU allocator setting


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_memory_serves_a_large_tensor_again_without_page_faults():
    """After keep_freed_memory, a freed 64 MB block is reused warm: allocating and freeing tensors
    of that size costs no fresh pages once the heap holds one (without the setting, every one
    costs 16,384 page faults of 4 KiB: it is mapped anew and unmapped on free)."""
    assert keep_freed_memory(torch.device("cpu"))
    assert not keep_freed_memory(torch.device("meta"))  # only the CPU allocator is touched

    def faults_of_one_tensor():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(2**24).fill_(1.0)  # allocated, written and freed
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults = [faults_of_one_tensor() for _ in range(6)]
    # The first grows the heap; a later one may grow it once more when a small block has settled
    # into the freed space. The rest are warm.
    assert sum(f < 2000 for f in faults[1:]) >= 3, f"page faults per 64 MB tensor: {faults}"
