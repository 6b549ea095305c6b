"""MatRIS: symmetries, derivatives, smoothness at both cutoffs, MoE, loss sharding, files, calculator."""

from __future__ import annotations

import dataclasses
import functools
import platform
import time
import warnings

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress

import matris
from matris import cpu_kernels, fused
from matris.batch import collate
from matris.config import LossConfig, ModelConfig
from matris.flops import model_flops
from matris.graph import graph_from_atoms, within_cutoff
from matris.layers import GatedMLP, line_attention_bucket
from matris.loss import multitask_loss
from matris.model import MatRIS, line_graph
from matris.moe import Experts, MoE
from matris.properties import derivatives, inputs, parameter_backward, predict

TASKS = ["pbe", "wb97"]


def make_model(seed: int = 0, **overrides) -> MatRIS:
    torch.manual_seed(seed)
    config = ModelConfig.from_preset("tiny", tasks=TASKS, **overrides)
    model = MatRIS(config).double()
    with torch.no_grad():  # larger random scales so every path visibly affects the energy
        for block in model.blocks:
            block.residual_scale.fill_(1.0)
            for moe in (block.message, block.update):
                if isinstance(moe, MoE):
                    moe.router.normal_(0, 1.0)
    return model


@pytest.fixture(scope="module")
def model() -> MatRIS:
    return make_model()


def cu_cell() -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)[:2]
    atoms.rattle(0.1, seed=1)
    return atoms


def methane() -> Atoms:
    atoms = molecule("CH4")
    atoms.rattle(0.05, seed=2)
    return atoms


def graph(atoms: Atoms, task: int = 0):
    return graph_from_atoms(atoms, 6.0, task=task)


def run(model: MatRIS, structures: list[Atoms], **kwargs) -> dict[str, torch.Tensor]:
    batch = collate([graph(a) for a in structures], dtype=torch.float64)
    return predict(model, batch, **kwargs)


def test_presets_and_config_errors():
    for name in ("tiny", "matris-6l", "moe-s", "moe-m", "moe-l"):
        assert ModelConfig.from_preset(name).preset == name
    with pytest.raises(ValueError, match="allowed: tiny, matris-6l, moe-s, moe-m, moe-l"):
        ModelConfig.from_preset("huge")
    with pytest.raises(ValueError, match="extra"):
        ModelConfig(width=3)
    tiny = ModelConfig.from_preset("tiny")
    assert tiny.num_experts >= 4 and tiny.top_k == 2 and tiny.moe_blocks


@pytest.mark.parametrize(
    ("name", "total", "active"),
    [("moe-s", 1.09e9, 0.19e9), ("moe-m", 2.47e9, 0.56e9), ("moe-l", 11.5e9, 2.89e9)],
)
def test_preset_parameter_counts(name, total, active):
    config = ModelConfig.from_preset(name)
    with torch.device("meta"):
        model = MatRIS(config)
    n_total = sum(p.numel() for p in model.parameters())
    n_experts = sum(p.numel() for m in model.modules() if isinstance(m, Experts) for p in m.parameters())
    n_active = n_total - n_experts + n_experts * config.top_k // config.num_experts
    assert abs(n_total / total - 1) < 0.03
    assert abs(n_active / active - 1) < 0.03


def test_line_graph_counts_all_ordered_pairs():
    atoms = cu_cell()
    g = graph(atoms)
    vectors = (
        atoms.positions[g.edge_index[1]] + g.edge_shift @ atoms.cell.array - atoms.positions[g.edge_index[0]]
    )
    length = torch.from_numpy(np.linalg.norm(vectors, axis=-1))
    a, b = line_graph(torch.from_numpy(g.edge_index), length, 4.0)
    degree = np.bincount(g.edge_index[0][length.numpy() < 4.0], minlength=len(atoms))
    assert len(a) == (degree * (degree - 1)).sum()
    assert (g.edge_index[0][a.numpy()] == g.edge_index[0][b.numpy()]).all()
    assert (a != b).all() and (length[a] < 4).all() and (length[b] < 4).all()


def test_rotation_translation_permutation_invariance(model):
    for atoms in (cu_cell(), methane()):
        ref = run(model, [atoms])
        moved = atoms.copy()
        rotation = torch.linalg.qr(
            torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        )[0]
        rot = rotation.numpy()
        moved.positions = atoms.positions @ rot.T + np.array([0.3, -1.2, 2.0])
        moved.cell = atoms.cell.array @ rot.T
        out = run(model, [moved])
        torch.testing.assert_close(out["energy"], ref["energy"], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out["forces"], ref["forces"] @ rotation.T, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(
            out["stress"][0], rotation @ ref["stress"][0] @ rotation.T, rtol=1e-8, atol=1e-10
        )
        perm = np.random.default_rng(0).permutation(len(atoms))
        out = run(model, [atoms[perm]])
        torch.testing.assert_close(out["energy"], ref["energy"], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out["forces"], ref["forces"][perm], rtol=1e-8, atol=1e-10)


def test_supercell_is_extensive(model):
    atoms = cu_cell()
    out, big = run(model, [atoms]), run(model, [atoms.repeat((2, 2, 2))])
    torch.testing.assert_close(big["energy"], 8 * out["energy"], rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(big["stress"], out["stress"], rtol=1e-8, atol=1e-10)


def test_forces_and_stress_match_finite_differences(model):
    calc = matris.MatRISCalculator(model, task="pbe")
    for atoms in (cu_cell(), methane()):
        atoms.calc = calc
        numeric = calculate_numerical_forces(atoms, eps=1e-4)
        np.testing.assert_allclose(atoms.get_forces(), numeric, rtol=1e-5, atol=1e-7)
    atoms = cu_cell()
    atoms.calc = calc
    numeric = calculate_numerical_stress(atoms, eps=1e-5)
    np.testing.assert_allclose(atoms.get_stress(), numeric, rtol=1e-5, atol=1e-7)


def scan(model: MatRIS, make, distances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Energies and forces along a path of geometries, all in one batch."""
    out = run(model, [make(d) for d in distances])
    n = len(make(distances[0]))
    return out["energy"].numpy(), out["forces"].numpy().reshape(len(distances), n, 3)


def assert_smooth(energy: np.ndarray, forces: np.ndarray):
    """No jumps: a step of size s in a sampled function shows up as a second difference of about s, while
    a smooth one gives about f'' h² (≈1e-9 here; without the attention sink the energy jumps by ~0.02 eV)."""
    assert np.abs(np.diff(energy, 2)).max() < 1e-6
    assert np.abs(np.diff(forces, 2, axis=0)).max() < 1e-5


@pytest.mark.parametrize("cutoff", [6.0, 4.0])
def test_energy_and_forces_continuous_across_cutoffs(model, cutoff):
    distances = np.linspace(cutoff - 0.02, cutoff + 0.02, 81)

    def dimer(d):
        return Atoms("CuO", positions=[[0, 0, 0], [d, 0, 0]])

    def trimer(d):  # the C-O bond crosses the cutoff while C-H stays at 1.1 Å and H-O near d
        return Atoms("CHO", positions=[[0, 0, 0], [0.4, 1.0, 0.2], [d, 0, 0]])

    for make in (dimer, trimer):
        energy, forces = scan(model, make, distances)
        assert_smooth(energy, forces)
    far = run(model, [trimer(4.5), trimer(4.6)])["energy"]
    assert abs(far[0] - far[1]) > 1e-6  # the far atom still interacts beyond 4 Å through the 6 Å graph


def test_experts_depend_only_on_element(model):
    structures = [cu_cell(), methane(), Atoms("CuCH", positions=[[0, 0, 0], [2, 0, 0], [0, 2.5, 0]])]
    batch = collate([graph(a) for a in structures], dtype=torch.float64)
    moe = model.blocks[0].message
    experts, weights = moe.route(batch.atomic_numbers)
    for z in batch.atomic_numbers.unique():
        rows = batch.atomic_numbers == z
        assert (experts[rows] == experts[rows][0]).all()
        torch.testing.assert_close(weights[rows], weights[rows][0].expand_as(weights[rows]))
    assert experts.shape[1] == 2 and torch.allclose(
        weights.sum(-1), torch.ones(len(weights), dtype=torch.float64)
    )


def test_single_expert_top1_equals_dense_model():
    hidden = 24
    moe = make_model(seed=4, num_experts=1, top_k=1, num_shared_experts=0, expert_hidden=hidden)
    dense = MatRIS(ModelConfig.from_preset("tiny", tasks=TASKS, moe_blocks=[], mlp_hidden=hidden)).double()
    state = {}
    for key, value in moe.state_dict().items():
        if ".experts." in key:
            state[key.replace(".experts.", ".") + ".weight"] = value[0].T
        elif not key.endswith(".router"):
            state[key] = value
    dense.load_state_dict(state, strict=True)
    assert all(isinstance(b.message, GatedMLP) for b in dense.blocks)
    structures = [cu_cell(), methane()]
    a, b = run(moe, structures), run(dense, structures)
    torch.testing.assert_close(a["energy"], b["energy"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a["forces"], b["forces"], rtol=1e-12, atol=1e-12)


def test_batch_equals_structures_one_by_one(model):
    structures = [cu_cell(), methane(), bulk("NaCl", "rocksalt", a=5.6)]
    together = run(model, structures)
    alone = [run(model, [a]) for a in structures]
    torch.testing.assert_close(together["energy"], torch.cat([o["energy"] for o in alone]))
    torch.testing.assert_close(together["forces"], torch.cat([o["forces"] for o in alone]))
    torch.testing.assert_close(together["stress"], torch.cat([o["stress"] for o in alone]))
    assert (together["stress"][1] == 0).all()


def test_line_bucket_count_changes_nothing_but_padding(model):
    """Every bucketing of the dense line graph gives the same energies, forces and stress, down to one
    bucket padded to the largest degree."""
    structures = [cu_cell(), methane(), bulk("NaCl", "rocksalt", a=5.6), bulk("Si", "diamond", a=5.4) * 2]
    ref = run(model, structures)
    for buckets in (1, 2, 20):
        other = make_model(line_buckets=buckets)
        other.load_state_dict(model.state_dict())
        out = run(other, structures)
        for key in ("energy", "forces", "stress"):
            torch.testing.assert_close(out[key], ref[key], rtol=1e-10, atol=1e-10)


def test_edges_past_a_shorter_model_cutoff_change_nothing():
    """A 5 Å model on 6 Å graphs: dropping the edges of 5 Å or more (`within_cutoff`, as the loader does
    for data built at a larger cutoff) leaves energies, forces, stress and parameter gradients as they are."""
    model = make_model(cutoff=5.0)
    structures = [cu_cell(), methane(), bulk("NaCl", "rocksalt", a=5.6)]
    full = [graph(a) for a in structures]
    short = [within_cutoff(g, 5.0) for g in full]
    assert 0 < sum(g.n_edges for g in short) < 0.7 * sum(g.n_edges for g in full)
    outputs = []
    for graphs in (full, short):
        model.zero_grad()
        pred = predict(model, collate(graphs, dtype=torch.float64), training=True)
        (pred["energy"].sum() + pred["forces"].square().sum()).backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        outputs.append(([pred[key].detach() for key in ("energy", "forces", "stress")], grads))
    for a, b in zip(*(o[0] + o[1] for o in outputs), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def labelled_structures(count: int = 20) -> list:
    """Small labelled structures of two tasks; one energy label is an outlier."""
    rng = np.random.default_rng(5)
    out = []
    for i in range(count):
        periodic = i % 2 == 0
        atoms = bulk("Cu", "fcc", a=3.6) * (2, 1, 1) if periodic else molecule("H2O" if i % 4 == 1 else "CH4")
        atoms.rattle(0.05, seed=i)
        g = graph(atoms, task=i % 3 % 2)
        out.append(
            dataclasses.replace(
                g,
                energy=float(rng.normal()) + (50.0 if i == 3 else 0.0),
                forces=rng.normal(size=(len(atoms), 3)),
                stress=rng.normal(size=(3, 3)) * 0.01 if periodic else None,
            )
        )
    return out


def test_training_step_backpropagates_through_forces():
    torch.manual_seed(0)
    model = MatRIS(ModelConfig.from_preset("tiny", tasks=TASKS))
    batch = collate(labelled_structures())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    durations = []
    for _ in range(3):
        start = time.perf_counter()
        pred = predict(model, batch, training=True)
        loss, metrics = multitask_loss(pred, batch, TASKS)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        durations.append(time.perf_counter() - start)
    assert min(durations) < 1.0
    assert {"pbe/energy", "pbe/force", "pbe/stress", "wb97/energy", "aux", "loss"} <= metrics.keys()
    # only the force term reaches the radial frequencies' second derivatives: check they train
    force_only = multitask_loss(
        predict(model, batch, training=True), batch, TASKS, LossConfig(energy=0, stress=0)
    )[0]
    grad = torch.autograd.grad(force_only, model.radial.frequencies)[0]
    assert grad.abs().sum() > 0
    changed = [k for k, v in model.named_parameters() if not torch.equal(v, before[k])]
    assert "radial.frequencies" in changed and len(changed) > 0.9 * len(before)


def test_force_loss_parameter_gradients_match_finite_differences():
    """The double backward is exact: parameter gradients of a loss on energy, forces and stress equal
    central differences of that loss, along a random direction of each kind of parameter."""
    model = make_model()
    batch = collate([graph(a) for a in (cu_cell(), methane())], dtype=torch.float64)

    def loss(training: bool = False) -> torch.Tensor:
        p = predict(model, batch, training=training)
        return p["energy"].square().sum() + p["forces"].square().sum() + p["stress"].square().sum()

    names = [
        "radial.frequencies",
        "blocks.0.refine.w1.weight",
        "blocks.0.line_attention.angle_k.weight",
        "blocks.1.atom_attention.q.weight",
        "blocks.1.message.experts.w2",
        "blocks.1.residual_scale",
        "blocks.0.refine_norm.weight",
        "blocks.1.bond_norm.weight",
    ]
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss(training=True), [params[n] for n in names])
    generator = torch.Generator().manual_seed(0)
    for name, grad in zip(names, grads, strict=True):
        p = params[name]
        direction = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        original = p.detach().clone()
        with torch.no_grad():
            p.copy_(original + 1e-6 * direction)
            plus = loss().item()
            p.copy_(original - 1e-6 * direction)
            minus = loss().item()
            p.copy_(original)
        finite_difference = (plus - minus) / 2e-6
        assert (grad * direction).sum().item() == pytest.approx(finite_difference, rel=1e-6), name


NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "eager"])
def test_fused_kernels_derivatives_to_second_order(monkeypatch, compiled, device):
    """The fused kernels' derived first and second derivatives equal numerical ones (float64), both
    compiled and run eagerly, and compiling did not fall back."""
    monkeypatch.setattr(fused._Compiled, "enabled", compiled)
    generator = torch.Generator().manual_seed(0)
    shapes = {
        "h": (7, 6), "b": (7, 4), "rest": (7,), "x": (2, 5, 4), "w": (4,),  # scaled_swiglu, rms_norm
        "qk": (2, 2, 3, 3), "qa": (2, 3, 2, 4), "envelope": (2, 1, 3, 3), "angle": (2, 3, 4, 3),  # line
        "q": (5, 2, 3), "kv": (5, 12), "switch": (5,),  # sink_messages
    }
    t = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    for name in ("rest", "envelope", "switch"):
        t[name] = t[name].abs() + 0.5
    t = {name: x.to(device, torch.float64).requires_grad_() for name, x in t.items()}
    cases = [
        (lambda h, b, rest: fused.scaled_swiglu(h, b, rest, 1e-3), ("h", "b", "rest")),
        (lambda x, w: fused.rms_norm(x, w, 1e-3), ("x", "w")),
        (lambda *args: fused.line_attention_weights(*args, cap=2.0), ("qk", "qa", "envelope", "angle")),
        (lambda *args: fused.sink_messages(*args, cap=2.0), ("q", "kv", "switch")),
    ]
    # first all three levels at other sizes in float32, as a training step runs them before any check:
    # kernels compiled for one size, then reused at another, once gave wrong double derivatives
    other = {
        "h": (9, 8), "b": (9, 5), "rest": (9,), "x": (3, 6, 8), "w": (8,),
        "qk": (3, 4, 5, 5), "qa": (3, 5, 4, 6), "envelope": (3, 1, 5, 5), "angle": (3, 5, 6, 5),
        "q": (40, 4, 8), "kv": (40, 64), "switch": (40,),
    }
    for op, names in cases:
        inputs = [(torch.rand(other[name], device=device) + 0.5).requires_grad_() for name in names]
        grads = torch.autograd.grad(op(*inputs).sum(), inputs, create_graph=True)
        torch.autograd.grad(sum(g.square().sum() for g in grads), inputs)
    for op, names in cases:
        args = tuple(t[name] for name in names)
        assert torch.autograd.gradcheck(op, args)
        assert torch.autograd.gradgradcheck(op, args)
    x, w = t["x"], t["w"]
    assert torch.allclose(fused.rms_norm(x, w, 1e-3), torch.nn.functional.rms_norm(x, (4,), w, 1e-3))
    assert fused.available() == compiled


def test_failed_compile_warns_once_and_training_goes_on_with_plain_ops(monkeypatch):
    monkeypatch.setattr(fused._Compiled, "enabled", True)
    kernel = fused._Compiled(fused._swiglu_forward)

    def no_compiler(*args):
        raise RuntimeError("no C++ compiler")

    kernel.compiled = no_compiler
    args = torch.randn(4, 6), torch.randn(4, 3), torch.rand(4), torch.tensor(1e-6)
    with pytest.warns(RuntimeWarning, match=r"no C\+\+ compiler"):
        out = kernel(*args)
    torch.testing.assert_close(out, fused._swiglu_forward(*args))
    assert not fused.available()
    x, w = torch.randn(3, 4, requires_grad=True), torch.randn(4)
    y = fused.rms_norm(x, w, 1e-6, fused=True)
    assert type(y.grad_fn).__name__ != "OpBackward"  # plain ops, not the fused Function
    torch.testing.assert_close(y, torch.nn.functional.rms_norm(x, (4,), w, 1e-6))


def test_kernel_past_the_recompile_limit_runs_uncompiled_and_the_others_stay_compiled(monkeypatch):
    """A rows_only kernel compiles once per width; past dynamo's limit only that kernel falls back."""
    monkeypatch.setattr(fused._Compiled, "enabled", True)
    kernel = fused._Compiled(fused._renamed(fused._rms_norm_forward, "rms_norm_limit_test"), rows_only=True)
    eps = torch.tensor(1e-6)
    x, w = torch.randn(3, 6), torch.randn(6)
    with torch._dynamo.config.patch(recompile_limit=2):
        for width in (4, 5):  # two widths, two graphs: the limit
            kernel(torch.randn(3, width), torch.randn(width), eps)
        with pytest.warns(RuntimeWarning, match="rms_norm_limit_test .*recompile_limit"):
            out = kernel(x, w, eps)
    torch.testing.assert_close(out, fused._rms_norm_forward(x, w, eps))
    assert fused.available()


@pytest.mark.parametrize("device", DEVICES)
def test_training_with_fused_kernels_equals_plain_ops(device):
    """Training mode (fused kernels) and evaluation mode (plain ops) give the same loss and parameter
    gradients of a loss on forces and stress."""
    model = make_model().to(device)
    batch = collate([graph(a) for a in (cu_cell(), methane())], dtype=torch.float64).to(torch.device(device))
    results = []
    for training in (True, False):
        model.train(training)
        p = predict(model, batch, training=True)
        loss = p["energy"].square().sum() + p["forces"].square().sum() + p["stress"].square().sum()
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)))
    model.train()
    (fused_loss, fused_grads), (plain_loss, plain_grads) = results
    assert fused_loss.item() == pytest.approx(plain_loss.item(), rel=1e-12)
    for a, b in zip(fused_grads, plain_grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


NEEDS_AVX2 = pytest.mark.skipif(
    not (platform.machine() == "x86_64" and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")),
    reason="the C++ ops of matris.cpu_kernels need x86-64 with AVX2",
)


def bucket_operands(g: int, m: int, h: int, c: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 operands of one line-attention bucket with ``c`` channels per head and the kernel's 8
    angle channels; the envelope is zero on the diagonal, as in `matris.layers.TripletBlocks`."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).requires_grad_()

    envelope = torch.rand(g, 1, m, m, generator=generator) * (1 - torch.eye(m))
    return dict(
        q=randn(g, m, h, c),
        k=randn(g, m, h, c),
        v=randn(g, m, h, c),
        qa=randn(g, m, h, 8),
        envelope=envelope.requires_grad_(),
        angle=randn(g, m, 8, m),
        angle_v=randn(h, 8, 1, c),
    )


@NEEDS_AVX2
@pytest.mark.parametrize("channels", [8, 16, 24])
def test_line_kernel_equals_bmm_form_to_second_order(channels):
    """The C++ op's output, its seven gradients and the second derivatives of a loss on them (what a force
    loss takes) equal the plain bmm form's, in float32, for heads of 8 to 24 channels."""
    x = bucket_operands(5, 11, 3, channels)
    assert cpu_kernels.line_applies(x["q"], x["qa"])  # builds the extension: a failed build fails here
    grad = torch.randn(5, 11, 3, channels, generator=torch.Generator().manual_seed(1)).requires_grad_()
    results = []
    for bucket in (cpu_kernels.line_attention, functools.partial(line_attention_bucket, fused=False)):
        out = bucket(**x, cap=2.0)
        first = torch.autograd.grad(out, list(x.values()), grad, create_graph=True)
        loss = sum((f * torch.cos(f)).sum() for f in first) + out.square().sum()
        results.append([out, *first, *torch.autograd.grad(loss, [grad, *x.values()])])
    for got, expected in zip(*results, strict=True):
        assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


@NEEDS_AVX2
@pytest.mark.parametrize("heads, channels", [(3, 8), (8, 16), (12, 24)])
def test_sink_kernel_equals_plain_form_to_second_order(heads, channels):
    """The C++ attention-sum op's messages, its three gradients and the second derivatives of a loss on
    them equal the plain form's in float32, for a part-filled group of eight heads, one, and one and a
    half."""
    generator = torch.Generator().manual_seed(0)
    edges = 37
    x = [
        torch.randn(edges, heads, channels, generator=generator).requires_grad_(),
        torch.randn(edges, 2 * heads * channels, generator=generator).requires_grad_(),
        torch.rand(edges, generator=generator).requires_grad_(),
    ]
    assert cpu_kernels.sink_applies(x[0])  # builds the extension: a failed build fails here
    assert type(cpu_kernels.sink_messages(*x, cap=2.0).grad_fn).__name__ == "_SinkMessagesBackward"
    grad = torch.randn(edges, heads, channels + 1, generator=generator).requires_grad_()
    results = []
    for messages in (cpu_kernels.sink_messages, functools.partial(fused.sink_messages, fused=False)):
        out = messages(*x, cap=2.0)
        first = torch.autograd.grad(out, x, grad, create_graph=True)
        loss = sum((f * torch.cos(f)).sum() for f in first) + out.square().sum()
        results.append([out, *first, *torch.autograd.grad(loss, [grad, *x])])
    for got, expected in zip(*results, strict=True):
        assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


@NEEDS_AVX2
def test_sink_kernel_rejects_mismatched_shapes_before_reading_memory():
    q, env = torch.randn(5, 2, 8), torch.rand(5)
    assert cpu_kernels.sink_applies(q)
    with pytest.raises(RuntimeError, match="kv must be"):
        cpu_kernels.sink_messages(q, torch.randn(5, 16), env, cap=2.0)  # keys without values
    with pytest.raises(RuntimeError, match="grad must be"):
        cpu_kernels._extension().sink_backward(torch.randn(5, 2, 8), q, torch.randn(5, 32), env, 2.0)


@NEEDS_AVX2
def test_training_step_with_cpu_kernels_equals_plain_ops(monkeypatch):
    """A float32 model shaped for the C++ ops (16 channels per head, 8 angle channels) trains through both,
    with the loss and parameter gradients of evaluation's plain ops, and FLOPs counted the same."""
    monkeypatch.setattr(fused._Compiled, "enabled", False)  # plain ops elsewhere: isolate the C++ ops
    calls = []

    def counting(op):
        def counted(*args, **kwargs):
            calls.append(op.__name__)
            return op(*args, **kwargs)

        return counted

    for name in ("line_attention", "sink_messages"):
        monkeypatch.setattr(cpu_kernels, name, counting(getattr(cpu_kernels, name)))
    torch.manual_seed(0)
    model = MatRIS(ModelConfig.from_preset("tiny", dim=32, num_heads=2, num_angular=7, tasks=TASKS))
    batch = collate([graph(a) for a in (cu_cell(), methane())], dtype=torch.float32)
    results, calls_per_mode = [], []
    for training in (True, False):
        model.train(training)
        p = predict(model, batch, training=True)
        loss = p["energy"].square().sum() + p["forces"].square().sum() + p["stress"].square().sum()
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)))
        calls_per_mode.append(len(calls))
    assert calls_per_mode[1] == calls_per_mode[0]  # training only
    assert calls.count("line_attention") >= len(model.blocks)
    assert calls.count("sink_messages") == len(model.blocks)  # the atom attention of every block
    (kernel_loss, kernel_grads), (plain_loss, plain_grads) = results
    assert kernel_loss.item() == pytest.approx(plain_loss.item(), rel=1e-5)
    for a, b in zip(kernel_grads, plain_grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
    model.train()
    counted_with_kernel = model_flops(model, batch)
    monkeypatch.setattr(cpu_kernels._State, "enabled", False)
    assert model_flops(model, batch) == counted_with_kernel  # counted on the bmm form either way


def test_failed_cpu_kernels_build_warns_once_and_keeps_compiled_forms(monkeypatch):
    monkeypatch.setattr(cpu_kernels._State, "enabled", True)

    def no_compiler():
        raise RuntimeError("g++: not found")

    monkeypatch.setattr(cpu_kernels, "_extension", no_compiler)
    x = bucket_operands(2, 4, 1)
    with pytest.warns(RuntimeWarning, match="g[+][+]: not found"):
        assert not cpu_kernels.line_applies(x["q"], x["qa"])
    assert not cpu_kernels._State.enabled
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the next call neither retries the build nor warns again
        assert not cpu_kernels.line_applies(x["q"], x["qa"])
        assert not cpu_kernels.sink_applies(x["q"])
    # the ops would call the failing build: these run on the compiled forms
    line_attention_bucket(**x, cap=2.0, fused=True)
    q, kv = x["q"].flatten(0, 1), torch.cat([x["k"], x["v"]], dim=-1).flatten(0, 1).flatten(1)
    fused.sink_messages(q, kv, torch.rand(q.shape[0]), cap=2.0)


def test_magmom_head_is_trained_where_labelled():
    model = make_model(seed=8, magmom_head=True)
    structures = [
        dataclasses.replace(g, magmoms=np.ones(g.n_atoms)) if i % 2 else g
        for i, g in enumerate(labelled_structures(6))
    ]
    batch = collate(structures, dtype=torch.float64)
    pred = predict(model, batch, training=True)
    assert pred["magmoms"].shape == (batch.num_atoms,)
    loss, metrics = multitask_loss(pred, batch, TASKS)
    assert {"pbe/magmom", "wb97/magmom"} <= metrics.keys()
    loss.backward()
    assert model.magmom_head[0].weight.grad.abs().sum() > 0


def test_parameter_backward_gives_the_full_backward_gradients_and_skips_positions_and_strain():
    """The training backward stops at the parameters: identical gradients, none for the geometry leaves."""
    model = make_model(seed=3)
    batch = collate(labelled_structures(4), dtype=torch.float64)
    positions, strain = inputs(batch)
    out = model(batch, positions, strain)
    pred = {**out, **derivatives(out["energy"], positions, strain, batch, create_graph=True)}
    loss, _ = multitask_loss(pred, batch, TASKS)
    loss.backward(retain_graph=True)
    full = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert positions.grad is not None and strain.grad is not None
    model.zero_grad(set_to_none=True)
    positions.grad = strain.grad = None
    parameter_backward(loss, model)
    pruned = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert pruned.keys() == full.keys() and len(full) > 10
    for name, grad in full.items():
        torch.testing.assert_close(pruned[name], grad, rtol=1e-12, atol=1e-14, msg=name)
    assert positions.grad is None and strain.grad is None


def two_rank_step(model: MatRIS, ranks: list[tuple[list, bool]]) -> list[tuple]:
    """Loss, metrics and gradients of two data-parallel ranks whose ``all_reduce`` adds the other's input.

    The other rank's input to each call is recorded by running that rank first: its first call needs
    nothing from us, its second needs our first, so three rounds give both ranks their exact inputs.
    """
    sent: list[list[torch.Tensor]] = [[], []]
    results: list[tuple] = [(), ()]
    for _ in range(3):
        for rank, (structures, active) in enumerate(ranks):
            other, mine = sent[1 - rank], []

            def all_reduce(x, other=other, mine=mine):
                mine.append(x.detach().clone())
                return x + other[len(mine) - 1] if len(mine) <= len(other) else x

            batch = collate(structures, dtype=torch.float64)
            model.zero_grad()
            pred = predict(model, batch, training=True)
            loss, metrics = multitask_loss(pred, batch, TASKS, LossConfig(), all_reduce, active=active)
            loss.backward()
            results[rank] = (loss.detach(), metrics, [p.grad.clone() for p in model.parameters()])
            sent[rank] = mine
    return results


def test_loss_shares_add_up_to_whole_batch_loss():
    """Per-rank losses and gradients sum to the whole batch's, robust statistics and MoE balance included;
    a rank without structures (stand-in batch, ``active=False``) adds nothing."""
    model = make_model(seed=6)
    structures = labelled_structures()
    batch = collate(structures, dtype=torch.float64)
    model.zero_grad()
    loss, metrics = multitask_loss(predict(model, batch, training=True), batch, TASKS)
    loss.backward()
    whole = (loss.detach(), metrics, [p.grad.clone() for p in model.parameters()])
    assert metrics["pbe/energy"] < 10  # the 50 eV outlier is down-weighted
    halves = [(structures[:9], True), (structures[9:], True)]
    idle = [(structures[:1], False), (structures, True)]
    for ranks in (halves, idle):
        first, second = two_rank_step(model, ranks)
        torch.testing.assert_close(first[0] + second[0], whole[0], rtol=1e-12, atol=1e-12)
        assert first[1] == pytest.approx(whole[1]) and second[1] == pytest.approx(whole[1])
        for a, b, c in zip(first[2], second[2], whole[2], strict=True):
            torch.testing.assert_close(a + b, c, rtol=1e-9, atol=1e-12)


def test_save_load_round_trip_and_corruption(tmp_path, model):
    model.set_reference_energies({"pbe": {29: -3.5, 1: -1.1}, "wb97": {6: -1030.0}})
    path = matris.save(model, tmp_path / "model.safetensors", {"step": 7})
    loaded = matris.load(path)
    structures = [cu_cell(), methane()]
    a, b = run(model.eval(), structures), run(loaded, structures)  # load gives eval mode: the same ops
    for key in ("energy", "forces", "stress"):
        assert torch.equal(a[key], b[key])
    assert loaded.config == model.config and matris.io.metadata(path) == {"step": 7}
    with pytest.raises(KeyError, match="known tasks: pbe, wb97"):
        model.set_reference_energies({"r2scan": {1: 0.0}})
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted"):
        matris.load(tmp_path / "bad.safetensors")
    (tmp_path / "short.safetensors").write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError, match=r"corrupted|not a"):
        matris.load(tmp_path / "short.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"hello world, not a model")
    with pytest.raises(ValueError, match="not a"):
        matris.load(tmp_path / "junk.safetensors")
    model.reference_energy.zero_()


def test_calculator_bulk_copper_and_methane(tmp_path):
    model = make_model(seed=7)
    path = matris.save(model, tmp_path / "m.safetensors")
    calc = matris.MatRISCalculator(path, task="wb97")
    cu = bulk("Cu", "fcc", a=3.6)
    cu.calc = calc
    assert np.isfinite(cu.get_potential_energy())
    assert np.abs(cu.get_forces()).max() < 1e-9  # one atom per cell: forces vanish by symmetry
    stress = cu.get_stress()
    assert (
        stress.shape == (6,) and np.allclose(stress[:3], stress[0]) and np.allclose(stress[3:], 0, atol=1e-9)
    )
    ch4 = molecule("CH4")
    ch4.calc = calc
    assert cu.get_potential_energy(force_consistent=True) == cu.get_potential_energy()
    assert ch4.get_forces().shape == (5, 3) and np.abs(ch4.get_forces().sum(0)).max() < 1e-5
    with pytest.raises(PropertyNotImplementedError):
        ch4.get_stress()
    with pytest.raises(ValueError, match="known tasks: pbe, wb97"):
        matris.MatRISCalculator(path, task="r2scan")


def test_reference_energies_shift_energy(model):
    atoms = methane()
    base = run(model, [atoms])["energy"]
    model.set_reference_energies({"pbe": {6: -2.0, 1: -0.5}})
    shifted = run(model, [atoms])["energy"]
    model.reference_energy.zero_()
    torch.testing.assert_close(shifted - base, torch.tensor([-4.0], dtype=torch.float64))


def test_model_flops_three_phases(model):
    batch = collate([graph(cu_cell()), graph(methane())], dtype=torch.float64)
    flops = model_flops(model, batch)
    assert flops["forward"] > 0 and flops["force_backward"] > 0.5 * flops["forward"]
    assert flops["param_backward"] > flops["forward"]
    assert flops["total"] == flops["forward"] + flops["force_backward"] + flops["param_backward"]
    assert fused.available()  # counting under a dispatch mode ran the kernels eagerly, not as a failure


@NEEDS_CUDA
def test_cuda_matches_cpu_and_trains(model):
    """The same float64 model on a GPU gives the CPU's energies, forces and stress, and a training step
    with the multi-task loss (double backward, MoE dispatch) runs there and yields finite gradients."""
    structures = [cu_cell(), methane(), bulk("NaCl", "rocksalt", a=5.6)]
    batch = collate([graph(a) for a in structures], dtype=torch.float64)
    on_gpu = make_model().cuda()
    cpu, gpu = predict(model, batch), predict(on_gpu, batch.to(torch.device("cuda")))
    for key in ("energy", "forces", "stress"):
        torch.testing.assert_close(gpu[key].cpu(), cpu[key], rtol=1e-9, atol=1e-9)
    labelled = collate(labelled_structures(), dtype=torch.float64).to(torch.device("cuda"))
    loss, _ = multitask_loss(predict(on_gpu, labelled, training=True), labelled, TASKS)
    loss.backward()
    grads = [p.grad for p in on_gpu.parameters() if p.grad is not None]
    assert len(grads) > 0.9 * len(list(on_gpu.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)


def test_a_killed_kernel_build_does_not_block_later_builds(tmp_path):
    """torch's build lock left by a killed builder is removed by the next builder instead of being waited
    on forever; a live builder's flock is still waited for."""
    import fcntl
    import warnings

    from matris.cpu_kernels import _sole_builder

    (tmp_path / "lock").write_text("")
    with pytest.warns(UserWarning, match="left by a killed build"), _sole_builder(tmp_path):
        assert not (tmp_path / "lock").exists()
        with open(tmp_path / "matris.flock") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with _sole_builder(tmp_path):
            pass


def test_kernel_modes_choose_compiled_and_cpp_ops(monkeypatch):
    """`select_kernels` (the trainer's ``train.kernels``): each mode sets both choices; ``auto`` follows
    the environment variables; an unknown mode is refused, naming the choices."""
    from matris import cpu_kernels, fused

    supported = cpu_kernels._State.supported
    for mode, compiled, native in [("plain", False, False), ("compiled", True, False), ("cpu", False, True)]:
        fused.select_kernels(mode)
        assert (fused.available(), cpu_kernels._State.enabled) == (compiled, native and supported), mode
    monkeypatch.setenv("MATRIS_COMPILE", "0")
    monkeypatch.delenv("MATRIS_CPU_KERNELS", raising=False)
    fused.select_kernels("auto")
    assert (fused.available(), cpu_kernels._State.enabled) == (False, supported)
    monkeypatch.setenv("MATRIS_COMPILE", "1")
    monkeypatch.setenv("MATRIS_CPU_KERNELS", "0")
    fused.select_kernels("auto")
    assert (fused.available(), cpu_kernels._State.enabled) == (True, False)
    with pytest.raises(ValueError, match="auto, plain, compiled, cpu"):
        fused.select_kernels("fast")
