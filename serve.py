"""Serving a finished run: tomorrow's new items ranked for its users, without retraining.

    python run.py --serve RUN --new-items DIR [--out OUT] [--recommend-k K]   (run.py wires serve())

A run folder (runfolder.py) holds the model it kept, `model.npz`. When that model can rank
new items (MMCPR with item content), `model.npz` also holds its content head (newitems.py),
so that a catalogue's new items, which no one has interacted with yet, are ranked from
their content alone: read and encoded as the catalogue's items were
(features.read_new_items), placed by the head (newitems.served_vectors), written as each
user's top K among them. This is the paper's content pathway at work after training
(ColdRec's item cold-start protocol).
"""
import numpy as np

import features
import newitems
import recommender
import runfolder
from data import DataError


def serve(run_dir, new_dir, k=20, device="cpu", log=print):
    """Rank the new items of new_dir for every user of the finished run in run_dir (each with a
    training pair) with its content head. Returns the outputs for runfolder.write_atomic:
    recommendations.tsv (each user's top k new items) and new_items.npz: item_ids, item_vec
    [n, d + F], the new items' head vectors [x W, x̂], to index beside the head's user vectors
    newitems.head_users: [head_user_emb / sd_head, beta head_profile / sd_prof]."""
    m = runfolder.load_run(run_dir)
    if "head_W" not in m:
        raise DataError(f"{run_dir}: its model has no content head to rank new items with "
                        "(MMCPR with item content has one)")
    widths = dict(zip(m["head_blocks"].tolist(), m["head_widths"].tolist()))
    ends = np.cumsum(m["head_widths"])
    part = lambda x: {b: x[e - w:e] for (b, w), e in zip(widths.items(), ends)}  # [F] -> {block: [w]}
    tags = {b[:-len(" tags")]: w for b, w in widths.items() if b.endswith(" tags")}
    encoders = dict(text=str(m["encoder_text"]) or None, image=str(m["encoder_image"]) or None,
                    precision=str(m["precision"])) if "precision" in m else None
    new = features.read_new_items(new_dir, {b: w for b, w in widths.items() if not b.endswith(" tags")},
                                  {b: (w, m[f"tag_{b}"].tolist() if f"tag_{b}" in m else None) for b, w in tags.items()},
                                  encoders, part(m["head_fill"]), m["item_ids"][m["ranked_items"]], device=device,
                                  log=log)
    ids = new["item_ids"]
    content = {**new["item_feats"], **{f"{b} tags": x for b, x in new["item_tags"].items()}}
    users, items = newitems.served_vectors(m, content)  # [U, d + F], [n, d + F]
    top, scores = recommender.recommend(users.to(device), items.to(device), m["ranked_users"],
                                        (np.zeros(0, np.int64),) * 2, k)
    log(f"served {len(ids)} new items to {len(m['ranked_users'])} users, from the {m['head_start']} start's space")
    tsv = runfolder.recommendations_tsv(m["user_ids"], ids, m["ranked_users"], top, scores)
    return {"recommendations.tsv": lambda f: f.write(tsv),
            "new_items.npz": lambda f: np.savez(f, item_ids=ids, item_vec=items.numpy())}
