"""genfast.patch / unpatch on real architectures built from their configs (random
weights, nothing downloaded): a tiny diffusers UNet2DConditionModel (both
time-embedding modes) and AutoencoderKL, and a DCGAN generator.

Accuracy rule (DESIGN.md, conftest.assert_close): the patched fp32 model may
differ from the same model run in fp64 by at most twice what the unpatched fp32
model differs by (relative to 1 + |ref|), plus atol = 1e-6 for the output's own
rounding; a patch that computed anything else (a dropped temb add, a wrong
group count, an unfolded scale) is off by O(1) and fails.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import genfast
from genfast.patch import PatchReport

from conftest import assert_close

ATOL = 1e-6


def compare(model, inputs, fn=lambda m, *a: m(*a)):
    """(out of patched fp32, report): checked against fp64 and unpatched fp32; unpatch restores bit for bit."""
    model64 = copy.deepcopy(model).double()
    keys = list(model.state_dict())
    params = dict(model.named_parameters())
    with torch.no_grad():
        lowp = fn(model, *inputs)
        ref64 = fn(model64, *[t.double() if t.is_floating_point() else t for t in inputs])
        report = genfast.patch(model)
        out = fn(model, *inputs)
    assert_close(out, ref64, lowp, atol=ATOL)
    assert list(model.state_dict()) == keys  # same keys, same (shared) parameters
    assert all(p is params[k] for k, p in model.named_parameters())
    genfast.unpatch(model)
    with torch.no_grad():
        assert torch.equal(fn(model, *inputs), lowp)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert list(model.state_dict()) == keys
    return out, report


KERNEL_CHOICES = ("Linear", "Conv2d", "ConvTranspose2d")  # modules patch runs through a faster CPU kernel, nothing fused


def names(entries, kind=None):
    """The entries' names: the fused blocks' (kind None), or those of one kind (e.g. "Linear")."""
    return sorted(e.name for e in entries if (e.kind not in KERNEL_CHOICES if kind is None else e.kind == kind))


def linear_names(model, skip=()):
    return sorted(n for n, m in model.named_modules() if type(m) is nn.Linear and n not in skip)


# ---- diffusers -------------------------------------------------------------------

def tiny_unet(**kw):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    config = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
                  # diffusers reads attention_head_dim as the number of heads here: headdims 8 and 16
                  sample_size=16, attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    return diffusers.UNet2DConditionModel(**{**config, **kw}).eval()


def tiny_vae():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                                   latent_channels=4, sample_size=16,
                                   down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2).eval()


def randomize_norms(model):
    """Non-trivial affine parameters, so a dropped weight or bias would show."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.GroupNorm) and m.affine:
                m.weight.copy_(1 + 0.3 * torch.randn_like(m.weight))
                m.bias.copy_(0.3 * torch.randn_like(m.bias))
    return model


def unet_inputs():
    return torch.randn(2, 4, 16, 16), torch.tensor([10, 700]), torch.randn(2, 7, 32)


def resnet_names(model):
    from diffusers.models.resnet import ResnetBlock2D
    return sorted(n for n, m in model.named_modules() if type(m) is ResnetBlock2D)


def attention_names(model):
    from diffusers.models.attention_processor import Attention
    return sorted(n for n, m in model.named_modules() if type(m) is Attention)


def geglu_names(model):
    from diffusers.models.activations import GEGLU
    return sorted(n for n, m in model.named_modules() if type(m) is GEGLU)


class CountAttention:
    """Counts the calls of genfast.attention by the patched attention processor."""

    def __init__(self, monkeypatch):
        import sys
        module = sys.modules["genfast.patch"]  # the package's attribute of that name is the function patch
        self.calls, original = 0, module.attention

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, "attention", counted)


@pytest.mark.parametrize("time_scale_shift", ["default", "scale_shift"])
def test_unet_patched_matches_unpatched(time_scale_shift, monkeypatch):
    unet = randomize_norms(tiny_unet(resnet_time_scale_shift=time_scale_shift))
    resnets, attentions = resnet_names(unet), attention_names(unet)
    count = CountAttention(monkeypatch)
    _, report = compare(unet, unet_inputs(), lambda m, *a: m(*a).sample)
    assert count.calls == len(attentions) == 8  # self- and cross-attention of 4 transformer blocks, once
    assert isinstance(report, PatchReport)
    assert len(geglu_names(unet)) == 4  # one feed-forward per transformer block
    assert names(report.replaced) == sorted(resnets + attentions + geglu_names(unet) + ["conv_norm_out"])
    # every other nn.Linear's weight is packed; a GEGLU's proj is the GEGLU's own matmul
    assert names(report.replaced, "Linear") == linear_names(unet, {n + ".proj" for n in geglu_names(unet)})
    film = "FiLM" if time_scale_shift == "scale_shift" else "add"
    assert all(film in e.detail for e in report.replaced if e.kind == "ResnetBlock2D")
    # The transformer blocks' GroupNorms have no activation after them: left, with a reason.
    assert names(report.left) == sorted(n for n, m in unet.named_modules() if n.endswith("attentions.0.norm")
                                        or n.endswith("attentions.1.norm"))
    assert all(e.kind == "GroupNorm" and e.detail for e in report.left)


def test_vae_patched_matches_unpatched():
    vae = randomize_norms(tiny_vae())
    resnets = resnet_names(vae)
    image = torch.randn(1, 3, 16, 16)
    _, report = compare(vae, (image,), lambda m, x: m(x).sample)
    # the mid blocks' attention: one head of 32, with a GroupNorm, 4D input and a residual inside
    assert names(report.replaced) == sorted(resnets + attention_names(vae) +
                                            ["encoder.conv_norm_out", "decoder.conv_norm_out"])
    assert names(report.replaced, "Linear") == linear_names(vae)
    assert names(report.left) == ["decoder.mid_block.attentions.0.group_norm",
                                  "encoder.mid_block.attentions.0.group_norm"]


def test_report_prints_both_lists():
    unet = tiny_unet()
    text = str(genfast.patch(unet))
    linears = len(linear_names(unet)) - 4  # the GEGLUs' projs are theirs
    convs = sum(type(m) is nn.Conv2d for m in unet.modules())
    assert text.splitlines()[0].startswith(f"genfast.patch: {21 + linears + convs} replaced, 4 left")
    assert "mid_block.resnets.0" in text and "not in a block genfast recognizes" in text
    assert "genfast.patch.AttnProcessor (headdim 8" in text
    assert repr(genfast.patch(unet)) == "PatchReport(replaced=0, left=4)"  # patching twice changes nothing new


def test_attention_left_where_sdpa_is_kept():
    """Headdims outside 8-56 and other processors keep PyTorch's SDPA: reported as left, with the reason."""
    from diffusers.models.attention_processor import AttnProcessor

    unet = tiny_unet(attention_head_dim=8)  # headdims 4 and 8
    unet.mid_block.attentions[0].transformer_blocks[0].attn1.set_processor(AttnProcessor())
    left = {e.name: e.detail for e in genfast.patch(unet).left}
    assert "headdim 4" in left["down_blocks.0.attentions.0.transformer_blocks.0.attn1"]
    assert "processor AttnProcessor " in left["mid_block.attentions.0.transformer_blocks.0.attn1"]
    assert "mid_block.attentions.0.transformer_blocks.0.attn2" not in left  # headdim 8: replaced


def test_patched_feed_forward_trains_like_the_original():
    """A transformer block's feed-forward (GEGLU, then Linear) patched: the bias fused into gated_act, the
    gradients of every parameter as eager's; SwiGLU likewise."""
    from diffusers.models.activations import SwiGLU

    unet = tiny_unet()
    ffs = [copy.deepcopy(unet.mid_block.attentions[0].transformer_blocks[0].ff).train(), nn.Sequential(SwiGLU(16, 24))]
    for ff in ffs:
        fused = copy.deepcopy(ff)
        report = genfast.patch(fused)
        fused_kinds = [e.kind for e in report.replaced if e.kind != "Linear"]
        assert fused_kinds == [type(ff[0] if isinstance(ff, nn.Sequential) else ff.net[0]).__name__]
        x = torch.randn(2, 5, 16 if isinstance(ff, nn.Sequential) else 64)
        out_ref, out = ff(x), fused(x)
        torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
        out_ref.square().sum().backward()
        out.square().sum().backward()
        for (name, p), q in zip(ff.named_parameters(), fused.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
        genfast.unpatch(fused)
        assert not any("forward" in m.__dict__ for m in fused.modules())


def test_patched_attention_keeps_sdpa_where_it_is_faster(monkeypatch):
    """fp16/bf16 above headdim 16 over 256 keys or more (PyTorch's kernel is faster there): the original
    processor; over fewer keys, and in fp32, genfast's."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    self_attn = Attention(query_dim=64, heads=2, dim_head=32).eval()
    cross = Attention(query_dim=64, heads=2, dim_head=32, cross_attention_dim=32).eval()
    genfast.patch(self_attn)
    genfast.patch(cross)
    count = CountAttention(monkeypatch)
    x, ctx = torch.randn(1, 300, 64), torch.randn(1, 7, 32)
    with torch.no_grad():
        self_attn.bfloat16()(x.bfloat16())
        assert count.calls == 0
        cross.bfloat16()(x.bfloat16(), ctx.bfloat16())
        assert count.calls == 1
        self_attn.float()(x)
        assert count.calls == 2


def test_patched_attention_falls_back_to_the_original(monkeypatch):
    """A mask, autograd through the attention, or another device/dtype: the original processor runs."""
    unet = tiny_unet()
    attn = copy.deepcopy(unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2)
    fused = copy.deepcopy(attn)
    genfast.patch(fused)
    count = CountAttention(monkeypatch)
    x, ctx = torch.randn(2, 9, 32), torch.randn(2, 5, 32)
    mask = torch.zeros(2, 1, 5)
    mask[0, :, 3:] = -10000.0  # diffusers' additive form: the first row ignores its last 2 tokens
    with torch.no_grad():
        # the original processor (its projections through the packed Linears: rounding apart, equal)
        torch.testing.assert_close(fused(x, ctx, attention_mask=mask), attn(x, ctx, attention_mask=mask),
                                   rtol=1e-5, atol=1e-6)
        assert count.calls == 0
        out = fused(x, ctx)
        assert count.calls == 1
        assert_close(out, copy.deepcopy(attn).double()(x.double(), ctx.double()), attn(x, ctx), atol=ATOL)
    out_ref, out = attn(x, ctx), fused(x, ctx)  # parameters require grad: the original, differentiable
    assert count.calls == 1 and torch.equal(out, out_ref)
    out.sum().backward()
    assert fused.to_q.weight.grad is not None


def test_unusual_modules_are_left_with_the_reason():
    unet = tiny_unet()
    seen = []
    blocks = unet.down_blocks[0].resnets[0], unet.down_blocks[1].resnets[0], unet.up_blocks[0].resnets[0]
    blocks[0].norm1.register_forward_hook(lambda *a: seen.append(1))
    blocks[1].norm2.eps = 0.0
    blocks[2].nonlinearity = nn.Mish()
    unet.conv_act = nn.GELU(approximate="tanh")
    x, t, ctx = unet_inputs()
    with torch.no_grad():
        ref = unet(x, t, ctx).sample
        report = genfast.patch(unet)
        left = {e.name: e.detail for e in report.left}
        assert "forward hooks" in left["down_blocks.0.resnets.0"]
        assert "eps=0.0" in left["down_blocks.1.resnets.0"]
        assert "Mish" in left["up_blocks.0.resnets.0"]
        assert "conv_act" in left["conv_norm_out"]
        assert "forward" not in blocks[0].__dict__ and "forward" in unet.mid_block.resnets[0].__dict__
        seen.clear()
        out = unet(x, t, ctx).sample
    assert seen == [1]  # the hooked norm still runs
    assert_close(out, ref.double(), ref, atol=1e-5)


def test_hook_added_after_patch_runs_the_original_block():
    unet = tiny_unet()
    genfast.patch(unet)
    block = unet.mid_block.resnets[0]
    seen = []
    block.norm2.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape))
    with torch.no_grad():
        unet(*unet_inputs())
    assert seen == [torch.Size([2, 64, 8, 8])]


def test_patched_resnet_block_trains_like_the_original():
    """Gradients flow through the fused blocks (group_norm_act's backward), dropout included."""
    unet = tiny_unet()
    block = copy.deepcopy(unet.mid_block.resnets[0]).train()
    block.dropout.p = 0.0  # training-mode dropout runs either way; p=0 keeps the comparison deterministic
    fused = copy.deepcopy(block)
    genfast.patch(fused)
    x, temb = torch.randn(2, 64, 5, 3), torch.randn(2, 128)
    out_ref, out = block(x, temb), fused(x, temb)
    out_ref.square().sum().backward()
    out.square().sum().backward()
    assert torch.allclose(out, out_ref, atol=1e-5)
    for (name, p), q in zip(block.named_parameters(), fused.parameters()):
        assert torch.allclose(q.grad, p.grad, rtol=1e-4, atol=1e-4), name


# ---- DCGAN ---------------------------------------------------------------------

class DCGANGenerator(nn.Module):
    """The DCGAN generator of the PyTorch examples, smaller: ConvTranspose2d → BatchNorm2d → ReLU ×3, then tanh."""

    def __init__(self, nz=16, ngf=8, nc=3):
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 4, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1), nn.BatchNorm2d(ngf), nn.LeakyReLU(0.2, inplace=True),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh())

    def forward(self, z):
        return self.main(z)


def dcgan():
    torch.manual_seed(0)
    g = DCGANGenerator()
    with torch.no_grad():  # trained-looking running statistics and affine parameters
        for m in g.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.5 * torch.randn_like(m.running_mean))
                m.running_var.copy_(0.5 + torch.rand_like(m.running_var))
                m.weight.copy_(1 + 0.3 * torch.randn_like(m.weight))
                m.bias.copy_(0.3 * torch.randn_like(m.bias))
    return g


def test_dcgan_eval_folds_batch_norm_into_the_conv(monkeypatch):
    calls = []
    original = torch._C._nn.slow_conv_transpose2d
    monkeypatch.setattr(torch._C._nn, "slow_conv_transpose2d", lambda *a: calls.append(1) or original(*a))
    g = dcgan().eval()
    _, report = compare(g, (torch.randn(3, 16, 1, 1),))
    assert names(report.replaced) == ["main.1", "main.4", "main.7"]
    assert all("folded into" in e.detail for e in report.replaced if e.kind == "BatchNorm2d")
    assert names(report.replaced, "ConvTranspose2d") == ["main.9"]  # to 3 channels, with the Tanh after it
    assert report.left == []
    # the folded stages hand the last conv a channels_last input: genfast's kernel, the Tanh in its pass
    assert calls == ([] if genfast.backends()["cpp"][0] else [1])


def test_dcgan_eval_with_grad_and_training_use_batch_norm_act():
    g = dcgan()
    ref = copy.deepcopy(g)
    genfast.patch(g)
    z = torch.randn(4, 16, 1, 1)
    for _ in range(2):  # training: batch statistics, running statistics updated as nn.BatchNorm2d does
        assert torch.allclose(g(z), ref(z), atol=1e-5)
    for (name, b), b_ref in zip(g.named_buffers(), ref.buffers()):
        assert torch.allclose(b, b_ref, rtol=1e-5, atol=1e-6), name
    g.eval(), ref.eval()
    z.requires_grad_()  # eval with gradients wanted (e.g. GAN inversion): not folded, still fused
    out, out_ref = g(z), ref(z)
    assert torch.allclose(out, out_ref, atol=1e-5)
    assert torch.allclose(torch.autograd.grad(out.sum(), z)[0], torch.autograd.grad(out_ref.sum(), z)[0],
                          atol=1e-5)


def test_folded_convs_hand_back_the_callers_layout():
    # on the CPU the folded convs run in channels_last; the caller gets eager's layout back
    g = dcgan().eval()
    ref = copy.deepcopy(g)
    genfast.patch(g)
    seq = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU()).eval()
    seq[1].running_var.uniform_(0.5, 2.0)
    seq_ref = copy.deepcopy(seq)
    genfast.patch(seq)
    x = torch.randn(2, 3, 9, 7)
    with torch.no_grad():
        for model, model_ref, inp in ((g, ref, torch.randn(2, 16, 1, 1)), (seq, seq_ref, x),
                                      (seq, seq_ref, x.contiguous(memory_format=torch.channels_last))):
            out, out_ref = model(inp), model_ref(inp)
            assert out.stride() == out_ref.stride()
            assert torch.allclose(out, out_ref, atol=1e-5)


def test_fold_follows_parameter_updates():
    g = dcgan().eval()
    ref = copy.deepcopy(g)
    genfast.patch(g)
    z = torch.randn(2, 16, 1, 1)
    with torch.no_grad():
        g(z)
        for model in (g, ref):  # an in-place update (optimizer step, load_state_dict) refreshes the fold
            model.main[1].running_mean.add_(1.0)
            model.main[3].weight.mul_(0.5)
        assert torch.allclose(g(z), ref(z), atol=1e-5)
        g.load_state_dict(dcgan().state_dict())
        ref.load_state_dict(dcgan().state_dict())
        assert torch.allclose(g(z), ref(z), atol=1e-5)


def test_sequential_leaves_what_it_cannot_fuse():
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Tanh(),
                        nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, eps=0.0), nn.ReLU(),
                        nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.BatchNorm2d(4), nn.SiLU())
    seq[7].register_forward_hook(lambda *a: None)
    report = genfast.patch(seq.eval())
    left = {e.name: e.detail for e in report.left}
    assert "Tanh" in left["1"] and "eps=0.0" in left["4"] and "forward hooks" in left["7"]
    assert names(report.replaced) == ["9"] and "not folded" in report.replaced[0].detail
    seq[4].eps = 1e-5  # recent PyTorch refuses eps=0 in forward; the module stays as it was left
    x = torch.randn(2, 3, 6, 5)
    with torch.no_grad():
        out = seq(x)
        genfast.unpatch(seq)
        assert torch.allclose(out, seq(x), atol=1e-6)


def test_instance_norm_stack_like_cyclegan():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), nn.InstanceNorm2d(8, affine=True),
                        nn.ReLU(True), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                        nn.InstanceNorm2d(8, track_running_stats=True), nn.LeakyReLU(0.2), nn.Conv2d(8, 3, 1))
    ref = copy.deepcopy(seq)
    x = torch.randn(2, 3, 9, 7)
    report = genfast.patch(seq)
    assert names(report.replaced) == ["1", "4"] and report.left == []
    for _ in range(2):  # training: instance statistics, running statistics updated
        assert torch.allclose(seq(x), ref(x), atol=1e-5)
    assert torch.allclose(seq[4].running_var, ref[4].running_var, atol=1e-6)
    seq.eval(), ref.eval()
    genfast.unpatch(seq)
    _, report = compare(seq, (x,))  # eval: running statistics for [4], fused as one scale/shift pass
    assert names(report.replaced) == ["1", "4"]
    genfast.patch(seq)
    with torch.no_grad():
        assert torch.allclose(seq(x[0]), ref(x[0]), atol=1e-5)  # unbatched input: the modules themselves


def test_patch_rejects_non_modules():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        genfast.patch("unet")


def test_patch_does_not_import_diffusers():
    """A model without diffusers blocks is patched without importing diffusers (seconds of import)."""
    import subprocess
    import sys

    code = ("import sys, torch.nn as nn, genfast\n"
            "g = nn.Sequential(nn.ConvTranspose2d(4, 8, 4), nn.BatchNorm2d(8), nn.ReLU()).eval()\n"
            "assert genfast.patch(g).replaced\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'diffusers'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---- weights packed for oneDNN (CPU inference) -----------------------------------------

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_matches_fp64(dtype, bias):
    torch.manual_seed(0)
    lin = nn.Linear(37, 53, bias=bias).to(dtype)
    lin64 = copy.deepcopy(lin).double()
    ref = copy.deepcopy(lin)
    report = genfast.patch(lin)
    assert [(e.name, e.kind) for e in report.replaced] == [("", "Linear")]
    calls = []
    lin.register_forward_hook(lambda *a: calls.append(1))  # hooks run around the packed forward
    for x in (torch.randn(5, 37), torch.randn(2, 3, 37), torch.randn(4, 74)[:, ::2], torch.randn(37, 6).t()):
        x = x.to(dtype)
        with torch.no_grad():
            assert_close(lin(x), lin64(x.double()), ref(x), atol=ATOL)
    assert len(calls) == 4
    if dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported():  # else F.linear: bf16 unsupported
        assert lin.__dict__["_genfast_plan"].packed._packed is not None  # the packed path ran


def patched_linear(n_in, n_out):
    """(an nn.Linear patched by genfast, an unpatched copy)."""
    torch.manual_seed(0)
    lin = nn.Linear(n_in, n_out)
    ref = copy.deepcopy(lin)
    genfast.patch(lin)
    return lin, ref


@needs_onednn
def test_packed_linear_follows_the_weight():
    lin, ref = patched_linear(24, 40)
    x = torch.randn(3, 24)

    def check():
        with torch.no_grad():
            torch.testing.assert_close(lin(x.to(lin.weight.dtype)), ref(x.to(ref.weight.dtype)), rtol=1e-5, atol=1e-5)

    check()
    for model in (lin, ref):  # an optimizer's in-place step
        with torch.no_grad():
            model.weight.mul_(-0.5)
    check()
    lin.load_state_dict(nn.Linear(24, 40).state_dict())
    ref.load_state_dict(lin.state_dict())
    check()
    lin.weight = nn.Parameter(torch.randn(40, 24))  # another tensor
    ref.weight = nn.Parameter(lin.weight.detach().clone())
    check()
    lin.bfloat16(), ref.bfloat16()
    check()


@needs_onednn
def test_patched_model_deep_copies_after_packing():
    """A copy of a patched model that has packed its weights (an EMA copy, say) packs its own."""
    torch.manual_seed(0)
    g = dcgan().eval()
    model = nn.Sequential(nn.Linear(8, 16), nn.Unflatten(1, (16, 1, 1)), g)
    genfast.patch(model)
    z = torch.randn(2, 8)
    with torch.no_grad():
        out = model(z)
        twin = copy.deepcopy(model)
        torch.testing.assert_close(twin(z), out)
        twin[0].weight.mul_(2)
        g.main[0].weight.mul_(2)  # the original only: the copy's fold must not follow it
        ref = copy.deepcopy(twin)
        genfast.unpatch(ref)
        torch.testing.assert_close(twin(z), ref(z), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_packed_linear_repacks_for_one_row_after_a_run_of_them():
    """A decode loop at batch 1: the prefill's rows, then one row a step; the packed layout follows after
    SWITCH_AFTER calls in a row, never on alternating calls; every result is F.linear's."""
    lin, ref = patched_linear(48, 80)
    plan = lin.__dict__["_genfast_plan"]
    after = plan.SWITCH_AFTER

    def call(rows):
        x = torch.randn(rows, 48)
        with torch.no_grad():
            torch.testing.assert_close(lin(x), ref(x), rtol=1e-5, atol=1e-5)

    call(7)
    assert plan.single_row is False
    for _ in range(after - 1):
        call(1)
    assert plan.single_row is False
    call(1)
    assert plan.single_row is True
    for _ in range(3 * after):  # alternating: no repack
        call(2 if _ % 2 else 1)
    assert plan.single_row is True
    for _ in range(after):
        call(3)
    assert plan.single_row is False


@needs_onednn
def test_packed_ops_failing_fall_back_for_good(monkeypatch):
    """A packed op that raises where PyTorch's path works (a platform without it): that call and every
    later one run PyTorch's path, with one warning; a caller's own error (a wrong shape) stays its own."""
    import genfast._onednn as onednn

    monkeypatch.setattr(onednn, "_failed", None)  # and back to None afterwards: the failure is simulated
    torch.manual_seed(0)
    lin, seq = nn.Linear(8, 4), nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    refs = copy.deepcopy(lin), copy.deepcopy(seq)
    genfast.patch(lin), genfast.patch(seq)
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            lin(torch.randn(2, 5))  # the caller's error, not a reason to give up on oneDNN
        assert onednn._failed is None

        def broken(*args):
            raise RuntimeError("no oneDNN here")

        monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", broken)
        monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise", broken)
        x, img = torch.randn(2, 8), torch.randn(2, 3, 6, 5)
        with pytest.warns(RuntimeWarning, match="no oneDNN here"):
            torch.testing.assert_close(lin(x), refs[0](x), rtol=1e-5, atol=1e-6)
        assert onednn._failed is not None
        torch.testing.assert_close(seq(img), refs[1](img), rtol=1e-5, atol=1e-5)  # no second warning needed


@needs_onednn
def test_packed_linear_leaves_what_it_cannot_pack():
    """Autograd, a 1-D input, fp64, an empty batch, inference tensors: F.linear itself, bit for bit."""
    lin, ref = patched_linear(16, 8)
    x = torch.randn(4, 16, requires_grad=True)
    out, out_ref = lin(x), ref(x)  # parameters require grad: differentiable, as eager
    assert torch.equal(out, out_ref)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    assert torch.equal(lin.weight.grad, ref.weight.grad)
    with torch.no_grad():
        for inp in (torch.randn(16), torch.randn(0, 16)):
            assert torch.equal(lin(inp), ref(inp))
        assert torch.equal(lin.double()(x.double()), ref.double()(x.double()))
    with torch.inference_mode():
        lin2 = nn.Linear(16, 8)  # inference-tensor weights have no version to key a packed copy on
        ref2 = copy.deepcopy(lin2)
        genfast.patch(lin2)
        assert torch.equal(lin2(x.detach().float()), ref2(x.detach().float()))
    genfast.unpatch(lin)
    assert "forward" not in lin.__dict__


@needs_onednn
@pytest.mark.parametrize("act", [nn.ReLU(), nn.LeakyReLU(0.1), nn.SiLU(), nn.GELU()], ids=lambda a: type(a).__name__)
def test_folded_conv_runs_its_activation_as_a_post_op(act):
    """Odd geometry (groups, stride, dilation, output padding, bias) for both conv kinds; a second batch size
    after the weights were packed for the first."""
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(6, 10, 3, stride=2, padding=1, dilation=2, groups=2), nn.BatchNorm2d(10),
                        copy.deepcopy(act),
                        nn.ConvTranspose2d(10, 4, 3, stride=2, padding=1, output_padding=1, groups=2, bias=False),
                        nn.BatchNorm2d(4), copy.deepcopy(act)).eval()
    for bn in (seq[1], seq[4]):
        bn.running_mean.normal_(0, 0.5), bn.running_var.uniform_(0.5, 2.0), bn.weight.data.normal_(1, 0.3)
    _, report = compare(seq, (torch.randn(3, 6, 11, 9),))
    assert names(report.replaced) == ["1", "4"] and all("folded into" in e.detail for e in report.replaced)
    ref = copy.deepcopy(seq)
    genfast.patch(seq)
    with torch.no_grad():
        seq(torch.randn(3, 6, 11, 9))
        x = torch.randn(5, 6, 13, 8)
        torch.testing.assert_close(seq(x), ref(x), rtol=1e-5, atol=1e-5)
    assert all(step._packed._packed is not None for step in seq.__dict__["_genfast_plan"].steps)


@pytest.mark.parametrize("channels_last", [False, True])
def test_small_conv_transpose_runs_gemm_col2im(channels_last, monkeypatch):
    """<= 4 output channels (odd geometry: stride 3, padding 2, output padding 1, dilation 2, bias), against fp64;
    autograd, output_size, 5 channels and groups keep the module's own forward. A channels_last input to the
    undilated second conv (the first's output keeps the layout) runs genfast's kernel instead."""
    torch.manual_seed(0)
    calls = []
    original = torch._C._nn.slow_conv_transpose2d
    monkeypatch.setattr(torch._C._nn, "slow_conv_transpose2d", lambda *a: calls.append(1) or original(*a))
    seq = nn.Sequential(nn.ConvTranspose2d(6, 3, 4, stride=3, padding=2, output_padding=1, dilation=2), nn.Tanh(),
                        nn.ConvTranspose2d(3, 1, 3, bias=False))
    for batch in (1, 5):
        x = torch.randn(batch, 6, 7, 5)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        _, report = compare(seq, (x,))
        assert names(report.replaced, "ConvTranspose2d") == ["0", "2"]
    assert len(calls) == (2 if channels_last and genfast.backends()["cpp"][0] else 4)
    calls.clear()
    genfast.patch(seq)
    x = torch.randn(2, 6, 7, 5, requires_grad=True)
    ref = copy.deepcopy(seq)
    genfast.unpatch(ref)
    assert torch.equal(seq(x), ref(x)) and calls == []  # autograd: the module's own forward
    with torch.no_grad():
        out_size = [a + 1 for a in ref[0](x).shape[-2:]]  # output_size asks for the extra output padding
        assert torch.equal(seq[0](x, output_size=out_size), ref[0](x, output_size=out_size))
    assert calls == []
    left = genfast.patch(nn.Sequential(nn.ConvTranspose2d(6, 5, 3), nn.ConvTranspose2d(6, 4, 3, groups=2)))
    assert left.replaced == []


@pytest.mark.skipif(not genfast.backends()["cpp"][0], reason="the C++ backend is not live")
@pytest.mark.parametrize("geometry", [
    # (batch, Cin, H, W, Cout, kernel, stride, padding, output padding)
    (2, 64, 8, 8, 3, 4, 2, 1, 0),  # DCGAN's last layer
    (1, 37, 5, 7, 1, 3, 2, 0, 0),
    (3, 20, 6, 5, 4, 5, 3, 2, 1),
    (2, 16, 4, 4, 2, 4, 1, 0, 0),
    (2, 3, 9, 9, 3, 2, 2, 0, 0),
    (1, 17, 1, 1, 3, 4, 1, 0, 0),  # a 1x1 latent
    (2, 33, 3, 11, 2, 1, 1, 0, 0),
    (2, 5, 3, 4, 2, 17, 2, 3, 0),  # a kernel taller than the old 16-row limit
])
@pytest.mark.parametrize("activation", ["none", "tanh"])
@pytest.mark.parametrize("bias", [False, True])
def test_conv_transpose_few_kernel(geometry, activation, bias):
    """csrc/cpu/deconv.cpp against fp64: every output element (the phases cover every column), within twice
    PyTorch's own fp32 error; tanh fused; a channels_last input only."""
    n, cin, h, w, cout, k, s, p, op = geometry
    torch.manual_seed(0)
    x = torch.randn(n, cin, h, w).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(cin, cout, k, k) / (cin * k) ** 0.5
    b = torch.randn(cout) if bias else None
    act = torch.tanh if activation == "tanh" else (lambda t: t)
    ref = act(F.conv_transpose2d(x.double(), weight.double(), None if b is None else b.double(), s, p, op))
    fp32 = act(F.conv_transpose2d(x, weight, b, s, p, op))
    got = torch.ops.genfast_cpu.conv_transpose_few(x, weight, b, [s, s], [p, p], [op, op], activation)
    assert got.shape == ref.shape and got.is_contiguous() and torch.isfinite(got).all()
    err, err_torch = (got.double() - ref).abs().max().item(), (fp32.double() - ref).abs().max().item()
    assert err <= 2 * err_torch + 1e-6, (err, err_torch)


@pytest.mark.skipif(not genfast.backends()["cpp"][0], reason="the C++ backend is not live")
def test_conv_transpose_few_kernel_writes_every_element():
    """An output block poisoned with NaN and handed back by the CPU pool (outputs of 8 MB or more) comes out
    whole: the phases write every (pixel, channel)."""
    torch.manual_seed(0)
    x = torch.randn(128, 16, 32, 32).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(16, 4, 4, 4) / 8
    run = lambda: torch.ops.genfast_cpu.conv_transpose_few(x, weight, None, [2, 2], [1, 1], [0, 0], "tanh")
    first = run()
    assert first.numel() * 4 >= 8 << 20
    expected = first.clone()
    first.fill_(float("nan"))
    del first
    torch.testing.assert_close(run(), expected, rtol=0, atol=0)


@pytest.mark.skipif(not genfast.backends()["cpp"][0], reason="the C++ backend is not live")
@pytest.mark.parametrize("bad", ["nchw", "fp64", "five_channels", "cin", "activation", "bias"])
def test_conv_transpose_few_kernel_refuses_bad_input(bad):
    """What genfast.patch never passes is refused with the argument named (the op is internal)."""
    x = torch.randn(1, 6, 4, 4).contiguous(memory_format=torch.channels_last)
    weight, bias, act = torch.randn(6, 3, 4, 4), None, "none"
    if bad == "nchw":
        x = x.contiguous()
    elif bad == "fp64":
        x, weight = x.double(), weight.double()
    elif bad == "five_channels":
        weight = torch.randn(6, 5, 4, 4)
    elif bad == "cin":
        weight = torch.randn(7, 3, 4, 4)
    elif bad == "activation":
        act = "relu"
    else:
        bias = torch.randn(4)
    name = {"nchw": "x", "fp64": "x", "five_channels": "weight", "cin": "weight", "activation": "activation",
            "bias": "bias"}[bad]
    with pytest.raises(RuntimeError, match=f"conv_transpose_few: {name}"):
        torch.ops.genfast_cpu.conv_transpose_few(x, weight, bias, [2, 2], [1, 1], [0, 0], act)


def test_patched_model_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) of a patched model traces PyTorch's and genfast's ops (no fold cache,
    no packed weights: inductor does its own), and gives the eager patched model's output."""
    g = dcgan().eval()
    model = nn.Sequential(nn.Linear(8, 16), nn.Unflatten(1, (16, 1, 1)), g)
    genfast.patch(model)
    z = torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(z), model(z), rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("channels_last", [False, True])
def test_weight_bound_conv2d_runs_packed(channels_last):
    """A conv whose weight has >= PACK_CONV_RATIO x its input's elements (a UNet's deepest level) runs packed
    (odd geometry: groups, stride, dilation, bias), against fp64, in the input's layout; a larger input, or
    autograd, runs the module's own forward, bit for bit."""
    from genfast.patch import PACK_CONV_RATIO

    torch.manual_seed(0)
    conv = nn.Conv2d(48, 40, 3, stride=2, padding=2, dilation=2, groups=2)
    x = torch.randn(1, 48, 3, 3)
    assert conv.weight.numel() >= PACK_CONV_RATIO * x.numel()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ref = copy.deepcopy(conv)
    out, report = compare(conv, (x,))
    assert [(e.name, e.kind) for e in report.replaced] == [("", "Conv2d")]
    assert out.stride() == ref(x).stride()
    genfast.patch(conv)
    with torch.no_grad():
        conv(x)
        assert conv.__dict__["_genfast_plan"]._packed is not None  # the packed path ran
        big = torch.randn(1, 48, 40, 40)  # the weight no longer outweighs it
        assert torch.equal(conv(big), ref(big))
    x.requires_grad_()
    assert torch.equal(conv(x), ref(x))
