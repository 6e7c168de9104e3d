"""UNetModel and DiTModel on their own: shapes, timesteps, attention mask, gradient checkpointing, sizes, save/load."""

from __future__ import annotations

import os

import pytest
import torch

from ldm import DIT_SIZES, DiTModel, UNetModel, dit_size_config
from ldm.tiny import TEXT_WIDTH, tiny_dit, tiny_unet

from conftest import assert_different

pytestmark = pytest.mark.usefixtures("single_thread")

BUILDERS = {"unet": tiny_unet, "dit": tiny_dit}
B, C, HW, L = 2, 4, 8, 7  # batch, latent channels, latent size, text tokens


@pytest.fixture(params=["unet", "dit"], scope="module")
def kind(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model(kind):
    return BUILDERS[kind]()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, HW, HW, generator=g)
    context = torch.randn(B, L, TEXT_WIDTH, generator=g)
    t = torch.tensor([10, 500])
    return x, t, context


@torch.no_grad()
def test_output_shape(kind, model, inputs):
    x, t, context = inputs
    out = model(x, t, context)
    assert out.sample.shape == (B, C, HW, HW)
    assert torch.isfinite(out.sample).all()
    assert model(x, t, context, return_dict=False)[0].shape == (B, C, HW, HW)
    # non-square latents (another grid than the DiT's cached position table)
    assert model(torch.randn(B, C, 4, 8), t, context).sample.shape == (B, C, 4, 8)


@torch.no_grad()
def test_learned_sigma_doubles_channels(kind, inputs):
    x, t, context = inputs
    m = BUILDERS[kind](learned_sigma=True)
    assert m.config.learned_sigma
    assert m(x, t, context).sample.shape == (B, 2 * C, HW, HW)


@torch.no_grad()
def test_scalar_and_batched_timesteps(kind, model, inputs):
    x, _, context = inputs
    batched = model(x, torch.tensor([10, 10]), context).sample
    torch.testing.assert_close(model(x, 10, context).sample, batched, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x, torch.tensor(10), context).sample, batched, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x, 10.0, context).sample, batched, rtol=0, atol=1e-6)
    # each sample gets its own timestep: a (B,) vector differs from a broadcast scalar where the entries differ
    mixed = model(x, torch.tensor([10, 500]), context).sample
    torch.testing.assert_close(mixed[0], batched[0], rtol=0, atol=1e-5)
    assert_different(mixed[1], batched[1])
    with pytest.raises(ValueError, match="timestep has 3 entries"):
        model(x, torch.tensor([1, 2, 3]), context)


@torch.no_grad()
def test_attention_mask(kind, model, inputs):
    x, t, context = inputs
    mask = torch.ones(B, L, dtype=torch.long)
    mask[:, 4:] = 0
    full = model(x, t, context).sample
    masked = model(x, t, context, encoder_attention_mask=mask).sample
    assert_different(full, masked)  # dropping tokens changes the prediction

    noisy = context.clone()
    noisy[:, 4:] = 100.0 * torch.randn(B, L - 4, TEXT_WIDTH)
    torch.testing.assert_close(model(x, t, noisy, encoder_attention_mask=mask).sample, masked, rtol=0, atol=1e-5)
    assert_different(model(x, t, noisy).sample, full)  # ...while unmasked they matter
    # a bool mask means the same as a 1/0 mask
    torch.testing.assert_close(model(x, t, context, encoder_attention_mask=mask.bool()).sample, masked)


@torch.no_grad()
def test_wrong_input_sizes_raise(kind, model, inputs):
    x, t, context = inputs
    with pytest.raises(ValueError, match="not divisible"):
        model(torch.randn(B, C, 5, 8), t, context)
    with pytest.raises(ValueError, match="batch"):
        model(x, t, context[:1])


def test_gradient_checkpointing_same_gradients(kind, inputs):
    x, t, context = inputs
    mask = torch.ones(B, L)
    mask[0, 5:] = 0
    m = BUILDERS[kind]().train()

    calls = []
    unit = m.blocks[0] if kind == "dit" else m.mid[0]  # a checkpointed unit
    unit.register_forward_pre_hook(lambda *_: calls.append(1))

    def loss_and_grads():
        m.zero_grad(set_to_none=True)
        loss = m(x, t, context, encoder_attention_mask=mask).sample.pow(2).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    loss_ref, grads_ref = loss_and_grads()
    assert len(calls) == 1
    assert len(grads_ref) == len([p for p in m.parameters() if p.requires_grad])

    m.enable_gradient_checkpointing()
    assert m.is_gradient_checkpointing
    calls.clear()
    loss_ckpt, grads_ckpt = loss_and_grads()
    assert len(calls) == 2, "the checkpointed unit should be re-run in the backward pass"
    torch.testing.assert_close(loss_ckpt, loss_ref)
    assert grads_ckpt.keys() == grads_ref.keys()
    for name in grads_ref:
        torch.testing.assert_close(grads_ckpt[name], grads_ref[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("name", ["DiT-S/2", "dit-s/2", "S/2"])
def test_dit_from_size_matches_paper(name):
    m = DiTModel.from_size(name, cross_attention_dim=TEXT_WIDTH, sample_size=8)
    cfg = m.config
    assert (cfg.depth, cfg.hidden_size, cfg.num_attention_heads, cfg.patch_size) == (12, 384, 6, 2)
    assert cfg.cross_attention_dim == TEXT_WIDTH
    assert len(m.blocks) == 12
    assert m.proj_out.out_features == 2 * 2 * 4  # p * p * latent channels


def test_dit_size_registry_matches_paper():
    # Peebles & Xie 2023, Table 1: (depth, hidden size, heads)
    paper = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
    assert {k: (v["depth"], v["hidden_size"], v["num_attention_heads"]) for k, v in DIT_SIZES.items()} == paper
    assert dit_size_config("DiT-XL/8") == dict(depth=28, hidden_size=1152, num_attention_heads=16, patch_size=8)


@pytest.mark.parametrize("name", ["DiT-M/2", "DiT-S/3", "DiT-S", "S2", ""])
def test_dit_bad_size_raises(name):
    with pytest.raises(ValueError, match="Unknown DiT size.*DiT-S/2"):
        DiTModel.from_size(name)


def _public(config) -> dict:
    """Config without private keys, lists as tuples (JSON turns tuples into lists)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if not k.startswith("_")}


@torch.no_grad()
def test_save_load_round_trip(kind, model, inputs, tmp_path):
    x, t, context = inputs
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    cls = UNetModel if kind == "unet" else DiTModel
    loaded = cls.from_pretrained(tmp_path)
    assert type(loaded) is cls
    assert _public(loaded.config) == _public(model.config)
    assert not loaded.training
    torch.testing.assert_close(loaded(x, t, context).sample, model(x, t, context).sample, rtol=0, atol=0)


def test_dit_checkpoint_of_the_old_layout_still_loads(inputs, tmp_path):
    """DiT checkpoints saved before the patch embedding and caption MLP became diffusers' ``PatchEmbed`` /
    ``PixArtAlphaTextProjection`` (keys ``patch_embed.weight``, ``caption_projection.0.*``) load, through
    ``from_pretrained`` and ``load_state_dict``, to the same model."""
    from safetensors.torch import load_file, save_file

    from ldm.models.dit import LEGACY_KEYS

    model = tiny_dit()
    model.save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    new_layout = load_file(weights)
    old_layout = {next((o for o, n in LEGACY_KEYS.items() if n == k), k): v for k, v in new_layout.items()}
    assert set(LEGACY_KEYS) <= set(old_layout) and not set(LEGACY_KEYS.values()) & set(old_layout)
    save_file(old_layout, weights)

    loaded = DiTModel.from_pretrained(tmp_path).eval()
    other = tiny_dit(seed=1)
    other.load_state_dict(dict(old_layout))
    with torch.no_grad():
        expected = model(*inputs).sample
        torch.testing.assert_close(loaded(*inputs).sample, expected, rtol=0, atol=0)
        torch.testing.assert_close(other(*inputs).sample, expected, rtol=0, atol=0)


def test_dit_positions_are_the_intended_coordinates_and_cached():
    from diffusers.models.embeddings import get_1d_sincos_pos_embed_from_grid, get_2d_sincos_pos_embed

    model = tiny_dit()  # 8 x 8 latents, patch 2: a trained grid of 4 x 4
    d = model.config.hidden_size

    def table(rows, cols):  # token (i, j) at (rows[i], cols[j]); the first half encodes the column
        r, c = torch.meshgrid(torch.tensor(rows, dtype=torch.float32), torch.tensor(cols, dtype=torch.float32),
                              indexing="ij")
        return torch.cat([get_1d_sincos_pos_embed_from_grid(d // 2, c.reshape(-1)),
                          get_1d_sincos_pos_embed_from_grid(d // 2, r.reshape(-1))], dim=1).float()[None]

    trained = get_2d_sincos_pos_embed(d, (4, 4), base_size=4, output_type="pt").float()[None]
    torch.testing.assert_close(model.positions(4, 4, torch.device("cpu")), trained, rtol=0, atol=0)
    torch.testing.assert_close(model.positions(2, 3, torch.device("cpu")), table([0, 1], [0, 1, 2]))
    half = [0.5 * k for k in range(8)]
    torch.testing.assert_close(model.positions(4, 8, torch.device("cpu")), table(half[:4], half))  # square patches
    torch.testing.assert_close(model.positions(8, 8, torch.device("cpu")), table(half, half))  # within 0..3.5
    assert model.positions(4, 8, torch.device("cpu")) is model.positions(4, 8, torch.device("cpu"))
    x = torch.randn(1, 4, 8, 16)
    assert model(x, torch.tensor([10]), torch.randn(1, 5, TEXT_WIDTH)).sample.shape == x.shape
