"""Data and scoring of the real-tier ORPO study (``reproduce/orpo_real.py``).

Data: the bundled Anthropic HH-RLHF harmless-base test pairs (``corpora`` name
``hh-rlhf-harmless-test``, read by ``data.preference.read_preferences`` in the ``hh`` format: the
dialogue before the last Assistant turn becomes the prompt's (role, content) turns, the two final
Assistant turns are the chosen and rejected responses), rendered with the model's own chat template
(SmolLM2's ChatML, with its default system line; ``data.model_template.ModelChatTemplate``).

Length filter, not truncation: a pair is kept only when both of its sequences (prompt + response +
end-of-turn token) fit ``max_tokens``, so every kept dialogue is whole and nothing is cut.

Splits: pairs are grouped by their *first user turn* (lower-cased, whitespace collapsed), a stricter
key than the whole prompt (HH has several conversations that open with the same request); the groups
are shuffled with a fixed seed and dealt to train, validation and test, so no prompt (and no
opening request) is in two splits. Pairs of a group beyond what its split needs are left out.

Scoring: ``pair_logps`` returns, per pair, the mean token log-prob of the chosen and of the rejected
response (ORPO's length-normalised likelihood, Hong et al. 2024 Eq. 2), the quantities of the
paper's Fig. 3 and of the preference accuracy (chosen > rejected).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from rizzearch.data.preference import PreferencePair, PreferenceSet, encode_pairs, read_preferences, resolve_template
from rizzearch.errors import DataError
from rizzearch.training.preference import score_pairs

HH_SOURCE = "hh-rlhf-harmless-test"
SPLITS = ("train", "val", "test")


def prompt_key(pair: PreferencePair) -> str:
    """The grouping key of a pair: its first user turn, lower-cased, whitespace collapsed."""
    first = next((c for r, c in pair.messages if r == "user"), pair.messages[0][1])
    return re.sub(r"\s+", " ", first.strip().lower())


def sequence_lengths(pairs: list[PreferencePair], tokenizer, template) -> list[int]:
    """Per pair, the longer of its two sequences in tokens: rendered prompt + response + end-of-turn token."""
    out = []
    for p in pairs:
        n_prompt = len(tokenizer.encode(template.render_prompt(p.messages)))
        n_resp = max(len(tokenizer.encode(template.render_response(r))) for r in (p.chosen, p.rejected)) + 1
        out.append(n_prompt + n_resp)
    return out


def split_by_prompt(pairs: list[PreferencePair], sizes: tuple[int, int, int], seed: int) -> tuple[list, list, list]:
    """Deal whole prompt groups (``prompt_key``) to train / val / test until each has its size.

    Groups are shuffled by ``seed``; each group goes to the first split that still needs pairs (its
    pairs beyond that need are dropped), so no key is in two splits. DataError when the pairs run out.
    """
    groups: dict[str, list[PreferencePair]] = {}
    for p in pairs:
        groups.setdefault(prompt_key(p), []).append(p)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    out: tuple[list, list, list] = ([], [], [])
    for k in keys:
        for split, need in zip(out, sizes):
            if len(split) < need:
                split.extend(groups[k][: need - len(split)])
                break
        else:
            break
    short = [f"{name} {len(s)}/{n}" for name, s, n in zip(SPLITS, out, sizes) if len(s) < n]
    if short:
        raise DataError(f"{HH_SOURCE}: too few pairs within the length limit for the splits ({', '.join(short)} pairs); "
                        "raise max_tokens or lower the split sizes")
    return out


@dataclass
class Splits:
    """The encoded splits and what was done to get them (counts and the length limit)."""

    train: PreferenceSet
    val: PreferenceSet
    test: PreferenceSet
    stats: dict


def load_splits(tokenizer, max_tokens: int, sizes: tuple[int, int, int], seed: int, read_limit: int | None = None) -> Splits:
    """Read the HH-RLHF pairs, keep those whose sequences fit ``max_tokens``, split them by prompt, encode them."""
    pairs, problems = read_preferences(HH_SOURCE, "hh", "skip", read_limit)
    template = resolve_template("model", tokenizer)
    lengths = sequence_lengths(pairs, tokenizer, template)
    kept = [p for p, n in zip(pairs, lengths) if n <= max_tokens]
    parts = split_by_prompt(kept, sizes, seed)
    encoded = [encode_pairs(ps, tokenizer, template, max_length=max_tokens, max_response_length=max_tokens - 1) for ps in parts]
    for name, ps in zip(SPLITS, encoded):
        if ps.stats["truncated_prompts"] or ps.stats["truncated_responses"] or len(ps) != len(ps.pairs):
            raise DataError(f"{HH_SOURCE}: the {name} split was truncated or lost pairs after the length filter (a bug)")
    stats = {"read": len(pairs), "skipped_records": len(problems), "within_max_tokens": len(kept), "max_tokens": max_tokens,
             "prompt_groups": len({prompt_key(p) for p in kept}),
             **{f"{name}_pairs": len(ps) for name, ps in zip(SPLITS, encoded)},
             **{f"{name}_mean_tokens": round(ps.stats["mean_tokens"], 1) for name, ps in zip(SPLITS, encoded)}}
    return Splits(*encoded, stats=stats)


def split_overlap(splits: Splits) -> dict[str, int]:
    """Number of shared prompt keys (first user turns) and shared whole prompts per pair of splits (all 0 by design)."""
    sets = {n: getattr(splits, n).pairs for n in SPLITS}
    out = {}
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            out[f"{a}/{b} first turns"] = len({prompt_key(p) for p in sets[a]} & {prompt_key(p) for p in sets[b]})
            out[f"{a}/{b} prompts"] = len({p.messages for p in sets[a]} & {p.messages for p in sets[b]})
    return out


def pair_tokens(ps: PreferenceSet, sides: tuple[str, ...] = ("chosen", "rejected")) -> int:
    """Real tokens of a set's sequences on the given sides (for the compute estimate)."""
    return int(sum(int(ps.tensors[f"{s}_attention_mask"].sum()) for s in sides))


# -- scoring ------------------------------------------------------------------------------------


@torch.no_grad()
def pair_logps(model, tensors: dict[str, Tensor], batch_size: int, device) -> tuple[Tensor, Tensor]:
    """Per pair, the mean token log-prob of the chosen and of the rejected response -> (N,), (N,) on the CPU."""
    chosen, rejected = [], []
    for fw in score_pairs(model, tensors, batch_size, device=torch.device(device)):
        chosen.append(fw.chosen.mean.float().cpu())
        rejected.append(fw.rejected.mean.float().cpu())
    return torch.cat(chosen), torch.cat(rejected)


def summarize(chosen: Tensor, rejected: Tensor) -> dict:
    """Preference accuracy (chosen > rejected; ties are wrong), mean log-probs and their margin over pairs."""
    return {"pref_accuracy": float((chosen > rejected).float().mean()), "chosen_logp": float(chosen.mean()),
            "rejected_logp": float(rejected.mean()), "logp_margin": float((chosen - rejected).mean()), "n": int(chosen.numel())}
