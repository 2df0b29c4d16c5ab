"""Train and evaluate MMCPR (or a baseline alone) on one dataset: the whole pipeline.

    python run.py --data ./baby --device cuda     # MMCPR pre-training + LightGCN fine-tuning
    python run.py --data ./baby --model lightgcn  # a baseline alone: lightgcn or mf
    python run.py --data ./movielens --cold-items 0.2  # 20% of the items new: ranked by content
    python run.py --serve RUN --new-items DIR     # a finished run ranks new items (serve.py)
    python run.py --data ./baby --cold-users 0.1  # 10% of the users new: placed from their history
    python run.py --serve RUN --new-users FILE    # ... and serves new users from a user<TAB>item history
    python run.py                                 # offline demo on synthetic data

A run reads top-down, as the paper's pipeline (run):
    load          features.py (a raw folder, converted once), data.py (the MMRec layout, splits)
    pre-train     mmcpr.py: graphs, intra- and inter-modal aggregation, BCE + InfoNCE
    fine-tune     recommender.py: MF-BPR or LightGCN from the pre-trained start, the L2 grid
                  chosen on valid; then, at that L2, with MGCN's view of the item content (from
                  both starts), valid keeping the best (--content-view, --start); evaluated on
                  test at the best valid epoch
    new items     newitems.py: the content head that ranks items without pairs
    new users     newusers.py: a user without a row placed from their history
    deliver       runfolder.py: model.npz, recommendations.tsv, metrics.json
The method's modules never import each other; this file wires them with plain numpy arrays.

An interrupted run resumes: the same command, in the same folder, carries on from
OUT/progress/ and ends with an uninterrupted run's metrics.json (runfolder.py). SIGINT or
SIGTERM stop a run at the end of the current epoch (seconds) with a checkpoint, exit 130 or
143; a second one stops it at once. Progress of other settings in the folder (a reused
--out) is refused, exit 2, never resumed or overwritten; --fresh discards it.
"""
import argparse
import json
import os
import shlex
import signal
import sys
import time

import numpy as np
import scipy.sparse as sp
import torch

import data as dataset
import features
import mmcpr
import newitems
import newusers
import recommender
import runfolder
import serve
from data import DataError


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--data", help="MMRec-layout or raw folder; omitted: run the offline demo on synthetic data")
    a("--model", choices=("mmcpr", "mf", "lightgcn"), default="mmcpr",
      help="mmcpr: pre-train, then fine-tune --recommender; mf, lightgcn: that baseline alone")
    a("--device", choices=("auto", "cpu", "cuda"), default="auto")
    a("--seed", type=int, default=0, help="training seed (never changes the split; the demo: also draws its data)")
    a("--out", help="output folder (default runs/<dataset>-<model>-s<seed>-<digest of the settings>; "
                    "the demo: OUT/<that name>)")
    a("--topk", default="10,20,50", help="comma-separated cut-offs K")
    a("--recommend-k", type=int, default=20,
      help="recommendations.tsv: each user's top K items (--serve: new items, or the new users' top K)")
    a("--serve", metavar="RUN", help="serve new items or new users from the finished run folder RUN (with --new-items "
                                     "or --new-users; writes --out, default RUN/new-<DIR's or FILE's name>): no training")
    a("--new-items", metavar="DIR", help="--serve: the new items, an items.jsonl or meta_<Cat>.json[l][.gz] "
                                         "(images/ beside it), or <m>_feat.npy with item_ids.txt")
    a("--new-users", metavar="FILE", help="--serve: new users' histories, a TSV with the header user<TAB>item, one "
                                          "row a pair, in the dataset's own ids")
    a("--fresh", action="store_true", help="discard the progress an interrupted run left in the folder; start over")
    a("--checkpoint-every", type=float, default=60.0,
      help="seconds between checkpoints within a pre-training or a fine-tuning (written at an epoch's end)")
    a("--cold-items", type=float, default=0.0,
      help="item cold start: this fraction of the items (drawn by --split-seed) is new, their pairs out of "
           "training; half are ranked for cold-valid, half for cold-test (default 0: off)")
    a("--cold-users", type=float, default=0.0,
      help="user cold start: this fraction of the users (drawn by --split-seed) is new, out of training; their "
           "training pairs are a history seen at ranking time, their valid pairs choose the new-user method's "
           "settings, their test pairs are scored (default 0: off)")
    g = p.add_argument_group("the recommender (a baseline, or MMCPR's fine-tuning)")
    g.add_argument("--recommender", choices=("mf", "lightgcn"), default="lightgcn",
                   help="the downstream model that fine-tunes MMCPR's representations")
    g.add_argument("--ui-layers", type=int, default=recommender.TUNED["lightgcn"]["layers"],
                   help="LightGCN propagation layers on the user-item graph "
                        "(the README gives each dataset's, chosen on valid)")
    g.add_argument("--dim", type=int, default=64, help="embedding size d")
    g.add_argument("--epochs", type=int, default=1000)
    g.add_argument("--patience", type=int, default=recommender.PATIENCE,
                   help="epochs without a better valid Recall@20")
    g.add_argument("--lr", type=float, help="default: " + ", ".join(f"{m} {t['lr']:g}" for m, t in recommender.TUNED.items()))
    g.add_argument("--l2", help="L2 weight on the batch's layer-0 embeddings: one value, or a comma-separated grid, "
                                "each value trained and the best on valid kept; default: the grid "
                                + ",".join(f"{v:g}" for v in recommender.L2_GRID) + " (the demo: "
                                + ", ".join(f"{m} {t['l2']:g}" for m, t in recommender.TUNED.items()) + ")")
    g.add_argument("--batch", type=int, default=2048, help="training triples per BPR step")
    g.add_argument("--finetune", choices=("vectors", "network"), default="vectors",
                   help="mmcpr: what the recommender fine-tunes. vectors: the pre-trained representations, handed "
                        "over as its layer-0 embeddings and trained as free parameters; network: the pre-trained "
                        "MMCPR network whose output they are, recomputed at every step, so content, the homogeneous "
                        "graphs and the attention keep training (mmcpr.Encoder)")
    g.add_argument("--finetune-lr", default="",
                   help="--finetune network: Adam's step size per part of the network, PART=LR separated by commas, "
                        "0 freezing a part; parts: id (ID embeddings), content (projectors), fusion (attention), "
                        "free (a per-node offset on the output, zero at the start). Default: id at a tenth of "
                        "--lr, the others at --lr (chosen on TikTok's valid split)")
    g.add_argument("--no-rescale", action="store_true",
                   help="fine-tune the pre-trained start at its own scale, not the one that fits BPR")
    g.add_argument("--content-view", nargs="?", const="on", choices=("auto", "on", "off"), default="auto",
                   help="MGCN's view of the item content modalities, added to the recommender's output and trained "
                        "with it in every step (recommender.ContentView). auto (default): mmcpr with item content "
                        "also fine-tunes with the view at the kept L2, and valid keeps one (--select; a baseline: "
                        "off); on (the bare flag): always, the grid too, and with --model lightgcn or mf that "
                        "baseline with MGCN's view; off: never")
    g.add_argument("--content-nce", type=float, default=1e-3,
                   help="--content-view: weight of MGCN's InfoNCE between the view and the recommender's output")
    g.add_argument("--start", choices=("pretrained", "best"),
                   help="mmcpr: the fine-tuning's start. best: also train the recommender from its own random "
                        "start at the kept L2 (on the CPU, bit for bit the baseline alone with the same flags) and "
                        "keep the start valid prefers (--select; the new items: by cold-valid Recall@20), "
                        "so the pre-training is kept only where valid says it helps. Default: best with the content view "
                        "(which on TikTok's valid trains better from the random start), pretrained without it")
    g.add_argument("--select", choices=("one-se", "best"), default="one-se",
                   help="how valid keeps one of the fine-tunings it weighs (--start best, the content view). "
                        "one-se (default): the first, the grid's (by default the paper's hand-off), unless another "
                        "clears it by more than one paired standard error of per-user valid Recall@20, then the best "
                        "of those (Breiman's one-standard-error rule: a gap inside valid's noise keeps the simpler "
                        "model); best: the best, on a tie the first (the runs before it, their run names too)")
    g = p.add_argument_group("MMCPR pre-training")
    g.add_argument("--pretrain-epochs", type=int, default=100)
    g.add_argument("--pretrain-batch", type=int, default=8192, help="training pairs per pre-training step")
    g.add_argument("--align-batch", type=int, default=1024, help="most items in one InfoNCE group")
    g.add_argument("--pretrain-lr", type=float, default=1e-2)
    g.add_argument("--pretrain-l2", type=float, default=1e-3, help="L2 weight on the batch's ego representations")
    g.add_argument("--knn", type=int, default=10,
                   help="neighbours kept per node in the homogeneous graphs (and in --content-view's item graphs)")
    g.add_argument("--layers", type=int, default=3, help="GCN layers of intra-modal aggregation")
    g.add_argument("--neg", type=int, default=8, help="sampled negatives per observed pair (BCE)")
    g.add_argument("--tau", type=float, default=0.2, help="InfoNCE temperature")
    g.add_argument("--lambda-align", type=float, default=0.01, help="weight of the alignment loss")
    g.add_argument("--fusion", choices=("attention", "mean"), default="attention")
    g.add_argument("--modality-dropout", type=float, default=0.0,
                   help="pre-training: per node, each modality but one drawn at random is masked in the attention with this probability")
    g.add_argument("--id-dropout", type=float, default=0.0,
                   help="pre-training: each step masks each item's ID modality with this probability, so that "
                        "content alone learns to stand in for it (DropoutNet)")
    g.add_argument("--modalities", help="item content modalities to use, e.g. image,audio; 'none': graph only "
                                        "(default: all)")
    g.add_argument("--no-align", action="store_true", help="drop the contrastive alignment loss")
    g.add_argument("--no-user-graph", action="store_true", help="no propagation over the user graph")
    g.add_argument("--no-item-graph", action="store_true", help="no propagation over the item graph")
    g.add_argument("--no-reviews", action="store_true", help="ignore review_feat.npy")
    g.add_argument("--no-standardize", action="store_true", help="feed content features raw, not z-scored per dimension")
    g.add_argument("--head-holdout", type=float, default=0.1,
                   help="no --cold-items: this share of the trained items (drawn by --split-seed) stands in for new "
                        "items to choose the new-item head's settings, which is then refitted on every item")
    g.add_argument("--no-tags", action="store_true", help="the new-item head ignores *_tag.npy (categories, release "
                                                         "year) and reads the content modalities alone")
    g = p.add_argument_group("raw data to features")
    g.add_argument("--kcore", type=int, default=0, help="k-core filter when converting raw data")
    g.add_argument("--split-seed", type=int, default=0, help="draws the new items of --cold-items; orders a user's interactions only where times are missing")
    g.add_argument("--text-encoder", help="local Hugging Face model folder (default: packaged all-MiniLM-L6-v2)")
    g.add_argument("--image-encoder", help="local Hugging Face vision model folder")
    g.add_argument("--precision", choices=("auto", "float32", "bf16"), default="auto",
                   help="encoders' arithmetic; auto: bf16 where the CPU or GPU computes it natively")
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
    if args.l2 is not None:
        try:
            args.l2 = tuple(dict.fromkeys(float(v) for v in args.l2.split(",")))  # in order, repeats once
            assert all(v >= 0 for v in args.l2)
        except (ValueError, AssertionError):
            p.error(f"--l2 must be non-negative numbers separated by commas, got {args.l2!r}")
    elif args.data is not None:  # a new dataset gets the grid; the demo keeps each model's one value
        args.l2 = recommender.L2_GRID
    if 20 not in args.topk:
        args.topk = tuple(sorted(args.topk + (20,)))  # early stopping reads Recall@20
    if (args.serve is None) != (args.new_items is None and args.new_users is None) or (args.new_items and args.new_users):
        p.error("--serve RUN goes with one of --new-items DIR and --new-users FILE")
    if not 0 < args.head_holdout < 1:
        p.error("--head-holdout must be in (0, 1)")
    for name in ("dim", "epochs", "batch", "pretrain_batch", "align_batch", "knn", "neg", "patience", "recommend_k"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("layers", "ui_layers", "pretrain_epochs"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be at least 0")
    if not 0 <= args.modality_dropout < 1:
        p.error("--modality-dropout must be in [0, 1)")
    if not 0 <= args.id_dropout < 1:
        p.error("--id-dropout must be in [0, 1)")
    if not 0 <= args.cold_items < 1:
        p.error("--cold-items must be in [0, 1)")
    if not 0 <= args.cold_users < 1:
        p.error("--cold-users must be in [0, 1)")
    if not 0.025 <= args.tau < np.inf:
        p.error("--tau must be at least 0.025 (below, float32 exp underflows in the InfoNCE)")
    if not args.checkpoint_every >= 0:
        p.error("--checkpoint-every must be a non-negative number of seconds")
    if args.seed < 0 or args.split_seed < 0:
        p.error("--seed and --split-seed must be at least 0")
    for name in ("lr", "pretrain_lr"):
        if getattr(args, name) is not None and not 0 < getattr(args, name) < np.inf:
            p.error(f"--{name.replace('_', '-')} must be a positive number")
    for name in ("pretrain_l2", "lambda_align", "content_nce"):
        if not 0 <= getattr(args, name) < np.inf:
            p.error(f"--{name.replace('_', '-')} must be a non-negative number")
    try:
        parts = [kv.split("=") for kv in args.finetune_lr.split(",") if kv]
        assert all(len(kv) == 2 and kv[0] in mmcpr.Encoder.PARTS for kv in parts)
        args.finetune_lr = {part: float(v) for part, v in parts}
        assert all(0 <= v < np.inf for v in args.finetune_lr.values())
    except (ValueError, AssertionError):
        p.error(f"--finetune-lr must be PART=LR separated by commas, PART one of {', '.join(mmcpr.Encoder.PARTS)}, "
                f"LR a non-negative number; got {args.finetune_lr!r}")
    if args.finetune_lr and args.finetune != "network":
        p.error("--finetune-lr goes with --finetune network")
    if args.finetune == "network" and not any(finetune_lr(args, args.recommender).values()):
        p.error("--finetune-lr: every part frozen, nothing to fine-tune")
    if args.finetune == "network" and args.model != "mmcpr" and args.data is not None:
        p.error(f"--finetune network: --model {args.model} has no pre-trained network")
    if args.start == "best" and args.model != "mmcpr" and args.data is not None:
        p.error(f"--start best: --model {args.model} has no pre-trained start to weigh")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available on this machine (use --device cpu or auto)")
    args.device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    return args


def inputs(args, data, model):
    """(item content {modality: [I, f]}, user reviews [U, f] or None, the warm items or None): what
    the run trains on, after --modalities, --no-reviews and --cold-items. The warm items are the
    catalogue known at training time, the only ones drawn as negatives and ranked: every item less
    the new ones and the ids that no split has (None: every item). Checked before training."""
    item_feats, user_feat = data["item_feats"], None if args.no_reviews else data["user_feat"]
    if model == "mmcpr" and data["cold"] and user_feat is not None:  # it pools reviews of new items too
        print("note: --cold-items ignores review_feat.npy: it was built from training reviews that include the "
              "new items'")
        user_feat = None
    if args.modalities:
        wanted = [] if args.modalities == "none" else args.modalities.split(",")
        missing = [m for m in wanted if m not in item_feats]
        if missing:
            raise DataError(f"--modalities: {', '.join(missing)} not in {data['name']} "
                            f"(has: {', '.join(item_feats) or 'none'})")
        item_feats = {m: item_feats[m] for m in wanted}
    c = data["cold"]  # new items: no negatives, not ranked in the warm task, their ID masked in pre-training
    warm = data["catalogue"] if c is None else np.setdiff1d(data["catalogue"], np.r_[c["valid_items"], c["test_items"]])
    warm = None if len(warm) == data["n_items"] else warm
    n_pool = data["n_items"] if warm is None else len(warm)  # the items a negative is drawn from
    full = np.flatnonzero(np.bincount(data["train"][0], minlength=data["n_users"]) >= n_pool)
    if len(full):  # training pairs are unique, so this user has every item: no negative to sample
        pool = "item" if warm is None else f"warm item ({n_pool} once --cold-items holds the new ones out)"
        raise DataError(f"{data['name']}: user {full[0]} has trained on every {pool}: no negative to sample")
    return item_feats, user_feat, warm


def content_views(args, item_feats, model):
    """The content views the fine-tunings weigh, each the item features [I, f] MGCN's view sees or
    None (no view), the L2 grid's first: off, a baseline under auto, or items without content:
    [None]; auto for mmcpr with content: [None, features]; on: [features]."""
    if args.content_view == "on" and not item_feats:
        raise DataError("--content-view: no item content modality to view")
    if args.content_view == "off" or not item_feats or (args.content_view == "auto" and model != "mmcpr"):
        return [None]
    return [list(item_feats.values())] if args.content_view == "on" else [None, list(item_feats.values())]


def train_matrix(data):
    """The binary train matrix R [U, I], scipy CSR."""
    u, i = data["train"]
    return sp.csr_matrix((np.ones(len(u), np.float32), (u, i)), shape=(data["n_users"], data["n_items"]))


def network_settings(args, data, warm):
    """mmcpr.network's settings from the flags: the pre-training's network, and the one --finetune network
    rebuilds from its parameters. The items outside the warm catalogue are its new items: no trained
    ID, never a negative."""
    return dict(dim=args.dim, knn=args.knn, layers=args.layers, fusion=args.fusion,
                modality_dropout=args.modality_dropout,
                new_items=None if warm is None else np.setdiff1d(np.arange(data["n_items"]), warm),
                user_graph=not args.no_user_graph, item_graph=not args.no_item_graph,
                standardize=not args.no_standardize, device=args.device)


def pretrain(args, data, item_feats, user_feat, warm, prog, stop, timings):
    """MMCPR's pre-training on the training pairs (mmcpr.pretrain), a resumable unit of the run. Its
    result keeps the trained network's parameters as network.<name> arrays (--finetune network)."""
    R = train_matrix(data)

    def train(checkpoint):
        t = time.perf_counter()
        pre = mmcpr.pretrain(R, item_feats, user_feat, epochs=args.pretrain_epochs, batch=args.pretrain_batch,
                             align_batch=args.align_batch, lr=args.pretrain_lr, neg=args.neg,
                             tau=args.tau, lambda_align=args.lambda_align, l2=args.pretrain_l2,
                             id_dropout=args.id_dropout, align=not args.no_align, seed=args.seed, log=print,
                             checkpoint=checkpoint, checkpoint_every=args.checkpoint_every, stop=stop,
                             **network_settings(args, data, warm))
        pre |= {f"network.{k}": v for k, v in pre.pop("network").items()}  # the unit keeps top-level arrays
        timings["graphs"] = pre["graph_seconds"]
        timings["pretrain"] = time.perf_counter() - t - pre["graph_seconds"]
        if not (np.isfinite(pre["user_emb"]).all() and np.isfinite(pre["item_emb"]).all()):
            raise FloatingPointError("pre-training diverged: non-finite representations (try a lower --pretrain-lr)")
        return pre

    pre = runfolder.unit(prog, "pretrain", stop, train)
    for side, w in pre["modality_weights"].items():
        print(f"mean {side} modality weights: " + ", ".join(f"{m} {v:.3f}" for m, v in w.items()))
    for note in pre["notes"]:
        print(f"note: {note}")
    return pre


def finetune_lr(args, downstream):
    """--finetune-lr as {part: learning rate} over mmcpr.Encoder.PARTS, the parts not named at the
    recommender's lr, the IDs at a tenth of it: chosen on TikTok's valid split (README, TikTok), where
    the IDs at the full rate and no free offset fell from the start."""
    lr = args.lr or recommender.TUNED[downstream]["lr"]
    return dict(id=lr / 10, content=lr, fusion=lr, free=lr) | args.finetune_lr


def pretrained_start(args, data, item_feats, user_feat, warm, pre, downstream):
    """recommender.train's keyword arguments for the pre-trained start, made anew for each fine-tuning:
    --finetune vectors, the pre-trained representations (user_init, item_init); --finetune network,
    layer0 = the pre-trained network (mmcpr.Encoder), rebuilt from the same inputs and its parameters."""
    if args.finetune == "vectors":
        return lambda: dict(user_init=pre["user_emb"], item_init=pre["item_emb"])
    params = {k.removeprefix("network."): v for k, v in pre.items() if k.startswith("network.")}

    def start():
        net, _ = mmcpr.network(train_matrix(data), item_feats, user_feat, log=lambda s: None,
                               **network_settings(args, data, warm))
        return dict(layer0=mmcpr.Encoder(mmcpr.load_network(net, params), finetune_lr(args, downstream)))
    return start


def fine_tune(args, data, downstream, start, warm, views, prog, stop, timings):
    """The fine-tunings valid weighs; test is never read. First the L2 grid (MMRec's convention):
    every value fine-tunes the same start (the pre-trained one, `start()` giving its keyword
    arguments for recommender.train; or, start None, the recommender's own random one) with early
    stopping, and the value with the best valid Recall@20 is kept. Then, at that L2, the other
    candidates: the random start (--start best, and by default with the view) and each other of
    `views` (content_views: the item features of MGCN's view, or None). The candidate with the
    best valid Recall@20 is kept, on a tie the first; with --select one-se (the default) the best
    of those that beat the grid's by more than the paired standard error of the two models'
    per-user valid Recall@20 (recommender.one_se_rule; `margin` in metrics.json), else the grid's. Valid's users
    are few (943 on movielens), and the best of three near-equal estimates is biased upward: the
    paper is silent here, and a gap inside valid's noise keeps the paper's hand-off. Returns
    ({candidate: train()'s result}, the models the new items may be served from; the choices for
    metrics.json: l2, grid, kept (the candidate), start, content_view, margin, candidates)."""

    def unit(name, l2, start, content):  # one fine-tuning, a resumable unit of the run
        def train(checkpoint):
            try:
                r = recommender.train(data["n_users"], data["n_items"], data["train"], data["valid"], data["test"],
                                      model=downstream, layers=args.ui_layers, dim=args.dim, lr=args.lr, l2=l2,
                                      batch=args.batch, epochs=args.epochs, patience=args.patience, ks=args.topk,
                                      rescale=not args.no_rescale, items=warm, content=content, knn=args.knn,
                                      content_nce=args.content_nce,
                                      device=args.device, seed=args.seed, log=print,
                                      checkpoint=checkpoint, checkpoint_every=args.checkpoint_every, stop=stop,
                                      **(start() if start else {}))
            except FloatingPointError as e:
                raise FloatingPointError(f"{downstream} with l2 {l2:g}: {e} (try a lower --lr)") from None
            timings["eval"] += sum(r["eval_seconds"])
            return r
        return runfolder.unit(prog, name, stop, train)

    candidates = []  # (name, start or None, the view's features or None), the grid's first
    for view in views:
        suffix = "" if view is None else "+view"
        if start:
            candidates.append(("pretrained" + suffix, start, view))
        if not start or args.start == "best" or (args.start is None and view is not None):
            candidates.append(("scratch" + suffix, None, view))

    name, start0, view0 = candidates[0]
    l2s, grid, res = args.l2 or (recommender.TUNED[downstream]["l2"],), [], None
    for k, l2 in enumerate(l2s):
        if len(l2s) > 1:
            print(f"--- {downstream} with l2 {l2:g} ({k + 1} of {len(l2s)})")
        r = unit(f"finetune-{l2!r}", l2, start0, view0)
        grid.append({"l2": l2, "best_epoch": r["best_epoch"], "valid_recall@20": r["valid"]["recall@20"]})
        if res is None or r["valid"]["recall@20"] > res["valid"]["recall@20"]:
            res, kept = r, l2
    if len(l2s) > 1:
        print(f"l2 kept: {kept:g}, the best valid recall@20 of the grid ("
              + ", ".join(f"{g['l2']:g}: {g['valid_recall@20']:.4f}" for g in grid) + ")")
    trained = {name: res}
    for name, s, view in candidates[1:]:  # is the pre-trained start, is the view worth keeping? Valid decides
        print(f"--- {downstream} from " + ("the pre-trained start" if s else "its own random start (scratch)")
              + (" with the content view" if view is not None else "") + f", l2 {kept:g}")
        trained[name] = unit(f"{name}-{kept!r}", kept, s, view)
    valid = {n: r["valid"]["recall@20"] for n, r in trained.items()}
    name, margin = max(valid, key=valid.get), None  # on a tie the first
    if args.select == "one-se" and len(valid) > 1:  # does the best clear the grid's by more than valid's noise?
        ev = recommender.Evaluator(data["n_items"], data["train"], data["valid"], ks=(20,), device=args.device,
                                   candidates=warm)
        per_user = lambda n: ev.evaluate(*(torch.as_tensor(trained[n][e], device=args.device)
                                           for e in ("user_emb", "item_emb")), per_user=True)["recall@20"]
        name, margin = recommender.one_se_rule(valid, per_user)
    if len(trained) > 1:
        why = "" if margin is None else f"; {margin['challenger']}'s gap {margin['gap']:+.4f}, paired SE {margin['se']:.4f}"
        print(f"kept: {name} (valid recall@20: " + ", ".join(f"{n} {v:.4f}" for n, v in valid.items()) + why + ")")
    return trained, dict(l2=kept, grid=grid, kept=name, start=name.removesuffix("+view"), margin=margin,
                         content_view=name.endswith("+view"),
                         candidates={n: {"best_epoch": r["best_epoch"], "valid_recall@20": r["valid"]["recall@20"]}
                                     for n, r in trained.items()})


def run(args, data, model, load_seconds, out, stop=None):
    """Pre-train (mmcpr) and fine-tune, or train a baseline (mf, lightgcn), on `data`; once
    everything has finished, writes into `out` metrics.json, model.npz (the kept model and, for
    mmcpr with item content, its new-item head), recommendations.tsv and, for mmcpr,
    pretrained.npz (the start of fine-tuning); returns the metrics dict. Resumes from
    out/progress/ (runfolder.open_progress); stop(), asked at the end of every epoch, stops the run
    with a checkpoint once it returns True (KeyboardInterrupt). timings_s count this invocation's seconds."""
    t0 = time.perf_counter()
    timings = dict(load=load_seconds, graphs=0.0, pretrain=0.0, eval=0.0)
    downstream = args.recommender if model == "mmcpr" else model
    item_feats, user_feat, warm = inputs(args, data, model)
    views = content_views(args, item_feats, model)
    prog = runfolder.open_progress(args, model, out, trained_on(data))
    pre = pretrain(args, data, item_feats, user_feat, warm, prog, stop, timings) if model == "mmcpr" else {}

    t = time.perf_counter()
    start = pretrained_start(args, data, item_feats, user_feat, warm, pre, downstream) if pre else None
    trained, chosen = fine_tune(args, data, downstream, start, warm, views, prog, stop, timings)
    res = trained[chosen["kept"]]
    timings["finetune"] = time.perf_counter() - t - timings["eval"]

    t = time.perf_counter()
    head_entry, head_npz = newitems.fit_head(data, model, item_feats, trained, ks=args.topk, holdout=args.head_holdout,
                                             split_seed=args.split_seed, tags=not args.no_tags, select=args.select,
                                             device=args.device)
    timings["head"] = time.perf_counter() - t

    t = time.perf_counter()  # new users: placed from their history by the candidate valid keeps (newusers.py)
    users_entry, users_npz = newusers.fit(data["n_users"], data["n_items"], data["train"], trained,
                                          args.ui_layers if downstream == "lightgcn" else 0, data["cold_users"],
                                          ks=args.topk, candidates=warm, valid=data["valid"],
                                          split_seed=args.split_seed, select=args.select, device=args.device)
    timings["new_users"] = time.perf_counter() - t

    # The deliverables: the kept model, and each user's top K among the items ranked (never a known pair)
    t = time.perf_counter()
    known = tuple(np.concatenate([data[s][j] for s in ("train", "valid", "test")]) for j in (0, 1))
    ranked_users = np.unique(data["train"][0])
    ranked_items = np.arange(data["n_items"]) if warm is None else warm
    top, scores = recommender.recommend(torch.as_tensor(res["user_emb"], device=args.device),
                                        torch.as_tensor(res["item_emb"], device=args.device), ranked_users, known,
                                        args.recommend_k, warm)
    tsv = runfolder.recommendations_tsv(data["user_ids"], data["item_ids"], ranked_users, top, scores)
    timings["recommend"] = time.perf_counter() - t
    model_npz = dict(user_emb=res["user_emb"], item_emb=res["item_emb"], user_ids=data["user_ids"],
                     item_ids=data["item_ids"], ranked_users=ranked_users, ranked_items=ranked_items, **head_npz,
                     **users_npz)
    timings["total"] = load_seconds + time.perf_counter() - t0
    metrics = dict(
        dataset=data["name"], model=model, recommender=downstream, seed=args.seed, device=args.device, **chosen,
        best_epoch=res["best_epoch"], valid=res["valid"], test=res["test"], start_scale=res["scale"],
        timings_s=timings, encode_seconds=data.get("encode_seconds", {}),
        seconds_per_epoch=dict(finetune=float(np.mean(res["epoch_seconds"])) if res["epoch_seconds"] else None,
                               eval=float(np.mean(res["eval_seconds"])),
                               pretrain=float(np.mean(pre["epoch_seconds"])) if pre.get("epoch_seconds") else None),
        n_users=data["n_users"], n_items=data["n_items"],
        **{f"n_{s}": len(data[s][0]) for s in ("train", "valid", "test")}, n_cold_users=data["n_cold"],
        modalities={side: list(w) for side, w in pre.get("modality_weights", dict(user={}, item={})).items()},
        modality_weights=pre.get("modality_weights"), notes=data["notes"] + pre.get("notes", []),
        cold=head_entry if data["cold"] else None, head=None if data["cold"] else head_entry,
        cold_users=users_entry if data["cold_users"] else None, new_users=None if data["cold_users"] else users_entry,
        history=res["history"], args=vars(args) | dict(model=model),
    )
    outputs = {"metrics.json": lambda f: f.write(json.dumps(metrics, indent=1).encode()),
               "model.npz": lambda f: np.savez(f, **model_npz), "recommendations.tsv": lambda f: f.write(tsv)}
    if model == "mmcpr":  # the start of fine-tuning, not the model that scored
        outputs["pretrained.npz"] = lambda f: np.savez(f, user_emb=pre["user_emb"], item_emb=pre["item_emb"])
    runfolder.finish(out, prog, outputs)
    report(metrics, out)
    return metrics


def report(metrics, out):
    """The run's closing lines: where its files are, and a table of its metrics."""
    ks, model, cold = metrics["args"]["topk"], metrics["model"], metrics["cold"]
    print(f"\n{metrics['dataset']} {model}" + (f" + {metrics['recommender']}" if model == "mmcpr" else "")
          + f": best epoch {metrics['best_epoch']}, {metrics['timings_s']['total']:.1f}s; model, recommendations, "
            f"metrics in {out}/")
    print("split".ljust(10) + "".join(f"{m}@{k}".rjust(14) for k in ks for m in ("recall", "ndcg")))
    for s in ("valid", "test"):
        print(s.ljust(10) + "".join(f"{metrics[s][f'{m}@{k}']:14.4f}" for k in ks for m in ("recall", "ndcg")))
    for s in ("valid", "test") if cold and cold["test"] else ():
        print(f"cold-{s}".ljust(10) + "".join(f"{cold[s][f'{m}@{k}']:14.4f}" for k in ks for m in ("recall", "ndcg")))
    if cold and cold["note"]:
        print(f"new items: {cold['note']}")
    users = metrics["cold_users"]
    if users:
        a = users["anchors"]
        print(f"new users ({len(users['users'])}, never trained), test recall@20: {users['test']['recall@20']:.4f}; "
              + ", ".join(f"{k} {a[k]['test']['recall@20']:.4f}" for k in ("popularity", "itemknn", "itemknn_tuned"))
              + f" (alpha {users['alpha']:g})")


def trained_on(data):
    """runfolder.digest of the data a run reads: the pairs of every split, each feature and tag
    array, the ids, and the precision the features were encoded in. A resumed run must find
    the same, or it would mix units trained on other data into one result."""
    arrays = {s: data[s] for s in ("train", "valid", "test")}
    arrays |= {f"{m}_feat.npy": x for m, x in data["item_feats"].items()}
    arrays |= {f"{b}_tag.npy": x for b, x in data["item_tags"].items()}
    if data["user_feat"] is not None:
        arrays["review_feat.npy"] = data["user_feat"]
    arrays["ids"] = (data["user_ids"], data["item_ids"])
    return runfolder.digest(arrays) | dict(precision=(data.get("encoders") or {}).get("precision"))


def load(args, folder):
    """The dataset of --data: a raw folder converted first (features.py), then the MMRec layout
    loaded and split (data.py), with a converted folder's own ids and tag names."""
    t = time.perf_counter()
    conversion, raw = {}, features.is_raw(folder)
    if raw:
        conversion = features.convert_raw(folder, kcore=args.kcore, split_seed=args.split_seed,
                                          text_encoder=args.text_encoder, image_encoder=args.image_encoder,
                                          device=args.device, precision=args.precision,
                                          rebuild=args.rebuild_features, log=print) or {}
    data = dataset.load_mmrec(folder, cold_items=args.cold_items, split_seed=args.split_seed,
                              cold_users=args.cold_users)
    data["item_tag_names"] = {}
    if raw:
        data["user_ids"], data["item_ids"] = features.raw_ids(folder, data["n_users"], data["n_items"])
        data["item_tag_names"] = features.tag_names(folder)
    data["encode_seconds"], data["encoders"] = conversion.get("encode_seconds", {}), conversion.get("encoders")
    return data, time.perf_counter() - t


def serve_run(args):
    """--serve RUN --new-items DIR, or --new-users FILE: a finished run ranks new items, or serves
    new users; no training. Exit status."""
    given = args.new_items or args.new_users
    name = os.path.basename(os.path.abspath(given))
    out = args.out or os.path.join(args.serve, "new-" + (os.path.splitext(name)[0] if args.new_users else name))
    try:
        if os.path.exists(os.path.join(out, "model.npz")):
            raise DataError(f"--out {out} holds a run: its recommendations.tsv would be overwritten")
        runfolder.check_writable(out)
        if args.new_users:
            outputs = serve.serve_users(args.serve, args.new_users, args.recommend_k, args.device)
        else:
            outputs = serve.serve(args.serve, args.new_items, args.recommend_k, args.device)
        os.makedirs(out, exist_ok=True)
        runfolder.write_atomic(out, outputs)
    except (DataError, ImportError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"new {'users' if args.new_users else 'items'}' recommendations and vectors in {out}/")
    return 0


def main(argv=None):
    args = parse_args(argv)
    if args.serve:
        return serve_run(args)
    folder, models = args.data, [args.model]
    try:  # the user's input and set-up: a missing file or package, bad data, nowhere to write
        runfolder.check_writable(args.out or "runs")
        if folder is None:  # the embedded demo: synthetic raw data, then the baselines against MMCPR
            folder, models = os.path.join(args.out or "runs", f"demo-data-{args.seed}"), ["mf", "lightgcn", "mmcpr"]
            print(f"no --data: running the offline demo on SYNTHETIC data generated in {folder}/")
            features.make_demo(folder, seed=args.seed)
        data, load_seconds = load(args, folder)
    except (DataError, ImportError, FileNotFoundError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results, signals = {}, []

    def on_signal(signum, frame):  # the first stops the run at the end of the epoch, a second at once
        signals.append(signum)
        if len(signals) > 1:
            print(f"stopped at once: {os.path.join(out, 'progress')}/ keeps the last checkpoint; the same command "
                  "resumes", file=sys.stderr)
            sys.exit(128 + signals[0])

    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:  # training: only bad input and divergence are one line; anything else is a bug, with its traceback
        for m in models:  # --out names the folder of a single run; the demo puts its runs under it
            name = runfolder.run_name(args, data["name"], m)
            out = args.out if args.out and args.data else os.path.join(args.out or "runs", name)
            with runfolder.locked(out):  # one run per folder
                try:
                    results[m] = run(args, data, m, load_seconds, out, stop=lambda: bool(signals))
                except FloatingPointError:  # diverged: the same command would diverge again
                    runfolder.discard_progress(out)
                    raise
    except KeyboardInterrupt:  # from stop(): the checkpoint is written
        signum = signals[0] if signals else signal.SIGINT
        command = shlex.join(["python", "run.py", *(sys.argv[1:] if argv is None else argv)])
        print(f"stopped by {signal.Signals(signum).name}: progress kept in {os.path.join(out, 'progress')}/; "
              f"to resume, run the same command: {command}", file=sys.stderr)
        return 128 + signum
    except (FileExistsError, runfolder.WriteError, DataError, FloatingPointError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)  # a folder in use or not ours is left as it is
        return 2
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    if len(results) > 1:
        print("\ndemo (synthetic data), test split:")
        for m, r in results.items():
            print(f"  {m:9s} recall@20 {r['test']['recall@20']:.4f}  ndcg@20 {r['test']['ndcg@20']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
