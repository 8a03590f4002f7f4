"""Optional LLM judge of support, through the OpenAI-compatible endpoint client.

LLM judges are not deterministic, which is the problem with RAGAS-style evaluators; so the judge is
asked ``runs`` times (temperature ``temperature``, seeds ``0..runs-1``) and we report the mean, the
spread (max - min of the 0/1 verdicts, and their standard deviation) and the majority verdict. A reply
that is neither YES nor NO counts as a failed run and is reported, not guessed.
"""

from __future__ import annotations

import re
import statistics

from rizzearch.errors import ConfigError

PROMPT = (
    "You check legal citations. Does the SOURCE support the CLAIM? Answer with exactly one word: YES or NO.\n\n"
    "SOURCE:\n{source}\n\nCLAIM:\n{claim}"
)


class LLMJudge:
    """Ask an endpoint whether a passage supports a claim, several times.

    Args:
        client: an ``EndpointGenerator`` (anything with ``chat(messages, temperature, seed)``).
        runs: how many times to ask.
        temperature: sampling temperature of the judge.
        max_source_chars: source text is cut to this length.
    """

    def __init__(self, client, runs: int = 3, temperature: float = 0.7, max_source_chars: int = 4000):
        if runs < 1:
            raise ConfigError(f"judge runs must be >= 1, got {runs}")
        self.client, self.runs, self.temperature, self.max_source_chars = client, runs, temperature, max_source_chars

    def judge(self, claim: str, source: str) -> dict:
        msgs = [{"role": "user", "content": PROMPT.format(source=source[: self.max_source_chars], claim=claim)}]
        votes, raw = [], []
        for seed in range(self.runs):
            reply = self.client.chat(msgs, temperature=self.temperature, seed=seed)
            raw.append(reply[:80])
            m = re.match(r"\W*(yes|no)\b", reply.strip(), re.I)
            if m:
                votes.append(1.0 if m.group(1).lower() == "yes" else 0.0)
        if not votes:
            return {"supported": False, "mean": None, "spread": None, "stdev": None, "runs": self.runs, "valid": 0, "replies": raw}
        mean = sum(votes) / len(votes)
        return {"supported": mean > 0.5, "mean": round(mean, 4), "spread": max(votes) - min(votes),
                "stdev": round(statistics.pstdev(votes), 4), "runs": self.runs, "valid": len(votes), "replies": raw}
