"""Train and evaluate MMCPR (or plain MF-BPR) on one dataset: the whole pipeline.

    python run.py --data ./baby --device cuda     # MMCPR pre-training + MF fine-tuning
    python run.py --data ./baby --model mf        # the MF-BPR baseline alone
    python run.py                                 # offline demo on synthetic data

Data flows one way: load (features.py) -> graphs and pre-training (mmcpr.py)
-> MF-BPR fine-tuning and evaluation (recommender.py) -> OUT/metrics.json.
The three modules never import each other; this file wires them together with
plain numpy arrays.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import scipy.sparse as sp
import torch

import features
import mmcpr
import recommender


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--data", help="MMRec-layout or raw folder; omitted: run the offline demo on synthetic data")
    a("--model", choices=("mmcpr", "mf"), default="mmcpr")
    a("--device", choices=("auto", "cpu", "cuda"), default="auto")
    a("--seed", type=int, default=0)
    a("--out", help="output folder (default runs/<dataset>-<model>-<seed>; the demo: OUT/<...>)")
    a("--topk", default="10,20,50", help="comma-separated cut-offs K")
    g = p.add_argument_group("MF-BPR fine-tuning")
    g.add_argument("--dim", type=int, default=64, help="embedding size d")
    g.add_argument("--epochs", type=int, default=1000)
    g.add_argument("--patience", type=int, default=20, help="epochs without a better valid Recall@20")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--l2", type=float, default=3e-2, help="L2 weight on the batch embeddings (chosen on valid)")
    g.add_argument("--batch", type=int, default=2048, help="training pairs per MF-BPR step")
    g = p.add_argument_group("MMCPR pre-training")
    g.add_argument("--pretrain-epochs", type=int, default=100, help="chosen on valid")
    g.add_argument("--pretrain-batch", type=int, default=8192, help="training pairs per pre-training step")
    g.add_argument("--align-batch", type=int, default=1024, help="most items in one InfoNCE group")
    g.add_argument("--pretrain-lr", type=float, default=1e-2)
    g.add_argument("--pretrain-l2", type=float, default=1e-3, help="L2 weight on the batch's ego representations")
    g.add_argument("--knn", type=int, default=10, help="neighbours kept per node in the homogeneous graphs")
    g.add_argument("--layers", type=int, default=3, help="GCN layers of intra-modal aggregation (chosen on valid)")
    g.add_argument("--neg", type=int, default=8, help="sampled negatives per observed pair (BCE)")
    g.add_argument("--tau", type=float, default=0.2, help="InfoNCE temperature")
    g.add_argument("--lambda-align", type=float, default=0.01, help="weight of the alignment loss (chosen on valid)")
    g.add_argument("--fusion", choices=("attention", "mean"), default="attention")
    g.add_argument("--modalities", help="item content modalities to use, e.g. image,audio (default: all)")
    g.add_argument("--no-align", action="store_true", help="drop the contrastive alignment loss")
    g.add_argument("--no-user-graph", action="store_true", help="no propagation over the user graph")
    g.add_argument("--no-item-graph", action="store_true", help="no propagation over the item graph")
    g.add_argument("--no-reviews", action="store_true", help="ignore review_feat.npy")
    g.add_argument("--no-standardize", action="store_true", help="feed content features raw, not z-scored per dimension")
    g = p.add_argument_group("raw data to features")
    g.add_argument("--kcore", type=int, default=0, help="k-core filter when converting raw data")
    g.add_argument("--text-encoder", help="local Hugging Face model folder (default: packaged all-MiniLM-L6-v2)")
    g.add_argument("--image-encoder", help="local Hugging Face vision model folder")
    g.add_argument("--rebuild-features", action="store_true", help="re-encode even if cached")
    args = p.parse_args(argv)
    if args.data is None:  # the demo's 6.6k training pairs: batches of 2048 or 8192 are too few steps
        p.set_defaults(batch=256, pretrain_batch=256)
        args = p.parse_args(argv)
    try:
        args.topk = tuple(sorted({int(k) for k in args.topk.split(",")}))
        assert all(k > 0 for k in args.topk)
    except (ValueError, AssertionError):
        p.error(f"--topk must be positive integers separated by commas, got {args.topk!r}")
    if 20 not in args.topk:
        args.topk = tuple(sorted(args.topk + (20,)))  # early stopping reads Recall@20
    for name in ("dim", "epochs", "batch", "pretrain_batch", "align_batch", "knn", "neg"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.layers < 0 or args.pretrain_epochs < 0 or args.patience < 1:
        p.error("--layers and --pretrain-epochs must be >= 0, --patience >= 1")
    if args.tau < 0.025:
        p.error("--tau must be at least 0.025 (below, float32 exp underflows in the InfoNCE)")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available on this machine (use --device cpu or auto)")
    args.device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    return args


def write_atomic(path, write):
    """Write through a temporary file in the same folder, then rename: never half-written."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    os.fchmod(fd, 0o644)  # mkstemp makes 0600
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def run(args, data, model, load_seconds):
    """Pre-train (mmcpr) and fine-tune MF-BPR on `data`; returns the metrics dict."""
    t0 = time.perf_counter()
    timings = dict(load=load_seconds, graphs=0.0, pretrain=0.0)
    item_feats, user_feat = data["item_feats"], None if args.no_reviews else data["user_feat"]
    if args.modalities:
        wanted = args.modalities.split(",")
        missing = [m for m in wanted if m not in item_feats]
        if missing:
            raise features.DataError(f"--modalities: {', '.join(missing)} not in {data['name']} "
                                     f"(has: {', '.join(item_feats) or 'none'})")
        item_feats = {m: item_feats[m] for m in wanted}
    name = f"{data['name']}-{model}-{args.seed}"  # the demo, two runs, puts both under --out
    out = args.out if args.out and args.data else os.path.join(args.out or "runs", name)
    os.makedirs(out, exist_ok=True)

    init, pre = {}, {}
    if model == "mmcpr":
        u, i = data["train"]
        R = sp.csr_matrix((np.ones(len(u), np.float32), (u, i)), shape=(data["n_users"], data["n_items"]))
        t = time.perf_counter()
        pre = mmcpr.pretrain(R, item_feats, user_feat, dim=args.dim, knn=args.knn, layers=args.layers,
                             epochs=args.pretrain_epochs, batch=args.pretrain_batch,
                             align_batch=args.align_batch, lr=args.pretrain_lr, neg=args.neg,
                             tau=args.tau, lambda_align=args.lambda_align, l2=args.pretrain_l2, fusion=args.fusion,
                             user_graph=not args.no_user_graph, item_graph=not args.no_item_graph,
                             align=not args.no_align, standardize=not args.no_standardize,
                             device=args.device, seed=args.seed, log=print)
        timings["graphs"] = pre["graph_seconds"]
        timings["pretrain"] = time.perf_counter() - t - pre["graph_seconds"]
        init = dict(user_init=pre["user_emb"], item_init=pre["item_emb"])
        for key in ("user_emb", "item_emb"):
            write_atomic(os.path.join(out, f"{key}.npy"), lambda f: np.save(f, pre[key]))
        for side, w in pre["modality_weights"].items():
            print(f"mean {side} modality weights: " + ", ".join(f"{m} {v:.3f}" for m, v in w.items()))
        for note in pre["notes"]:
            print(f"note: {note}")

    t = time.perf_counter()
    res = recommender.train_mf(data["n_users"], data["n_items"], data["train"], data["valid"], data["test"],
                               dim=args.dim, lr=args.lr, l2=args.l2, batch=args.batch, epochs=args.epochs,
                               patience=args.patience, ks=args.topk, device=args.device, seed=args.seed,
                               log=print, **init)
    timings["eval"] = sum(res["eval_seconds"])
    timings["finetune"] = time.perf_counter() - t - timings["eval"]
    timings["total"] = load_seconds + time.perf_counter() - t0

    metrics = dict(
        dataset=data["name"], model=model, seed=args.seed, device=args.device, best_epoch=res["best_epoch"],
        valid=res["valid"], test=res["test"], timings_s=timings,
        seconds_per_epoch=dict(finetune=float(np.mean(res["epoch_seconds"])) if res["epoch_seconds"] else None,
                               eval=float(np.mean(res["eval_seconds"])),
                               pretrain=float(np.mean(pre["epoch_seconds"])) if pre.get("epoch_seconds") else None),
        n_users=data["n_users"], n_items=data["n_items"],
        **{f"n_{s}": len(data[s][0]) for s in ("train", "valid", "test")}, n_cold_users=data["n_cold"],
        modalities={side: list(w) for side, w in pre.get("modality_weights", dict(user={}, item={})).items()},
        modality_weights=pre.get("modality_weights"), notes=pre.get("notes", []),
        history=res["history"], args=vars(args) | dict(model=model),
    )
    write_atomic(os.path.join(out, "metrics.json"), lambda f: f.write(json.dumps(metrics, indent=1).encode()))
    ks = args.topk
    print(f"\n{data['name']} {model}: best epoch {res['best_epoch']}, {timings['total']:.1f}s, metrics in {out}/")
    print("split  " + "".join(f"{m}@{k}".rjust(14) for k in ks for m in ("recall", "ndcg")))
    for s in ("valid", "test"):
        print(s.ljust(7) + "".join(f"{metrics[s][f'{m}@{k}']:14.4f}" for k in ks for m in ("recall", "ndcg")))
    return metrics


def main(argv=None):
    args = parse_args(argv)
    try:
        folder, models = args.data, [args.model]
        if folder is None:  # the embedded demo: synthetic raw data, then MF against MMCPR
            folder, models = os.path.join("runs", "demo-data"), ["mf", "mmcpr"]
            print(f"no --data: running the offline demo on SYNTHETIC data generated in {folder}/")
            features.make_demo(folder, seed=args.seed)
        t = time.perf_counter()
        if features.is_raw(folder):
            features.convert_raw(folder, kcore=args.kcore, seed=args.seed, text_encoder=args.text_encoder,
                                 image_encoder=args.image_encoder, device=args.device,
                                 rebuild=args.rebuild_features, log=print)
        data = features.load_mmrec(folder)
        load_seconds = time.perf_counter() - t
        results = {m: run(args, data, m, load_seconds) for m in models}
    except (features.DataError, ValueError, ImportError, OSError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(results) > 1:
        print("\ndemo (synthetic data), test split:")
        for m, r in results.items():
            print(f"  {m:6s} recall@20 {r['test']['recall@20']:.4f}  ndcg@20 {r['test']['ndcg@20']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
