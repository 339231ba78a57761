"""The node's DP randomness: Poisson sampling and Gaussian noise from seeds the server can neither set nor learn.

Every round draws two fresh 64-bit seeds from the operating system's CSPRNG (``secrets``), one for
the Poisson sampler and one for the noise, and seeds dedicated ``torch.Generator`` s with them (and
torch's global generator, which dropout uses). Nothing the server sends enters them: two rounds with
the same run seed, round number and weights get independent noise, so subtracting their updates
does not cancel it.

Opacus' ``secure_mode`` would draw noise from ``torchcsprng``, which is not available for current
PyTorch releases. We use the next best thing: an OS-entropy seed per round for torch's generator,
plus Opacus' floating-point-attack mitigation (each noise value is the normalised sum of several
Gaussian draws; Mironov 2012 / Holohan & Braghin 2021), which the trainer switches on. torch's
generator is not a CSPRNG: an adversary who saw its raw outputs could predict later ones, but the
server only ever sees sums of clipped gradients plus noise, never raw draws, and every round starts
from a fresh seed.

Simulation only: ``fedtune-sim --insecure-reproducible-seed S`` derives the seeds from S, the round
and the node, so a run can be repeated exactly. The ledger entry of every round records which kind
of randomness it used (``rng``); a deployed node (``fedtune-client``) refuses that setting.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

import torch

SECRET = "secrets"
SEEDED_PREFIX = "seeded-insecure:"


@dataclass(frozen=True)
class RoundSeeds:
    """Seeds of one round; ``kind`` is what the ledger records."""

    sampler: int
    noise: int
    kind: str  # "secrets", or "seeded-insecure:<seed>" (simulation only)

    @classmethod
    def secret(cls) -> RoundSeeds:
        return cls(secrets.randbits(63), secrets.randbits(63), SECRET)

    @classmethod
    def insecure(cls, seed: int, server_round: int, node: str) -> RoundSeeds:
        """Reproducible seeds (simulation only): a hash of the node's own seed, the round and the node."""
        digest = hashlib.sha256(f"{seed}/{server_round}/{node}".encode()).digest()
        return cls(int.from_bytes(digest[:8], "big") >> 1, int.from_bytes(digest[8:16], "big") >> 1,
                   f"{SEEDED_PREFIX}{seed}")

    def generators(self, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
        """(sampler generator on the CPU, noise generator on ``device``); also seeds torch's global RNG."""
        torch.manual_seed(self.noise ^ self.sampler)
        sampler = torch.Generator().manual_seed(self.sampler)
        noise = torch.Generator(device=device).manual_seed(self.noise)
        return sampler, noise
