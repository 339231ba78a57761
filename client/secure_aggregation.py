"""Secure aggregation on the node: Flower's own SecAgg+ client mod around the fedtune ClientApp.

A round that the server runs under :class:`flwr.server.workflow.SecAggPlusWorkflow` reaches the node as four
TRAIN messages (setup, share keys, collect masked vectors, unmask); :func:`secure_aggregation_mod` hands them
to ``flwr.client.mod.secaggplus_mod``, which generates the node's keys and mask seeds (``os.urandom``, never
from the server) and masks what the node sends. Only in the third stage does the node train: the mod calls
:func:`_summed`, which runs the ordinary training handler (the same admission, charge and DP-SGD as a plain
round) and turns its reply into what goes into the sum:

- the update (trained adapter minus the round's global adapter), encoded on the secure sum's integer grid
  with the node's secret randomness (:mod:`fedtune.common.wire.secure_sum`) and, under client-dp, clipped and
  given its share of Skellam noise (:mod:`fedtune.common.privacy.distributed`); a refusal or an error sends
  zeros, so that it adds nothing to the sum;
- beside the masked vector, individually: the wire contract's reply fields (status, epsilon, receipt, node
  signature; no adapter) and the number of clamped coordinates.

The training handler learns that a round is securely aggregated only from a marker this mod sets (one the
server cannot set: the mod removes it from every incoming message), so a request that claims secure aggregation
without it, or the reverse, is refused as a bad request, and a node whose policy requires secure aggregation
refuses plain rounds.
"""

from __future__ import annotations

import logging
import math
import secrets
from typing import cast

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE
from flwr.compat.common.recorddict_compat import fitres_to_recorddict

from fedtune.common.privacy.distributed import SkellamShare
from fedtune.common.wire.arrays import Arrays, record_to_arrays, sent_arrays
from fedtune.common.wire.contract import ARRAYS, REQUEST, ErrorReply, RoundRequest, WireError
from fedtune.common.wire.secure_sum import (
    MODULUS,
    clamp,
    flatten,
    randomised_round,
    step,
    summed_names,
    target_range,
    value_range,
)

log = logging.getLogger("fedtune.client")
SECURE = "fedtune.secure-sum"  # the marker: set only by this mod, on rounds that arrived through SecAgg+
_LEGACY_INS = ("fitins.parameters", "fitins.config")


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Route SecAgg+ rounds through Flower's secaggplus_mod; pass every other message on unchanged."""
    msg.content.config_records.pop(SECURE, None)  # only this mod may say a round is securely aggregated
    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    return secaggplus_mod(msg, context, _summed(call_next))


def _protocol(context: Context) -> dict[str, float]:
    """The SecAgg+ parameters this node agreed to in the setup stage (kept in the mod's state)."""
    state = context.state.config_records[RECORD_KEY_STATE]
    return {k: cast(float, state[k]) for k in ("sample_num", "threshold", "clipping_range", "target_range",
                                                "mod_range", "max_weight")}


def _grid_problems(request: RoundRequest, protocol: dict[str, float]) -> list[str]:
    """The protocol's grid must be the one the request implies (a server cannot widen it or make it wrap)."""
    nodes = int(protocol["sample_num"])
    expected = value_range(request.aggregation, request.plan, request.privacy)
    out = []
    if nodes < 2 or int(protocol["target_range"]) != target_range(nodes) or protocol["mod_range"] != MODULUS:
        out.append(f"target range {protocol['target_range']} for {nodes} nodes is not the secure sum's")
    if protocol["clipping_range"] != expected or protocol["max_weight"] != 1.0:
        out.append(f"value range {protocol['clipping_range']} is not the request's {expected}")
    if not 2 <= int(protocol["threshold"]) <= nodes:
        out.append(f"threshold {protocol['threshold']} is not between 2 and the {nodes} nodes")
    return out


def _summed(call_next: ClientAppCallable) -> ClientAppCallable:
    """The training handler as the SecAgg+ mod's next step: its reply becomes a vector for the sum."""

    def handle(msg: Message, context: Context) -> Message:
        content = msg.content
        reference = record_to_arrays(content.array_records[ARRAYS]) if ARRAYS in content.array_records else {}
        protocol = _protocol(context)
        for key in _LEGACY_INS:
            content.array_records.pop(key, None)
            content.config_records.pop(key, None)
        try:
            request = RoundRequest.from_record(content.config_records[REQUEST])
            if problems := _grid_problems(request, protocol):
                raise WireError(problems)
        except (KeyError, WireError) as err:
            log.error("secure round refused (code BAD_REQUEST): %s", err)
            return _to_sum(msg, ErrorReply("BAD_REQUEST").to_content(), np.zeros(_size(reference, None)), 0)
        content.config_records[SECURE] = ConfigRecord({"threshold": int(protocol["threshold"])})
        reply = call_next(msg, context)
        update = reply.content.array_records.pop(ARRAYS, None)
        names = summed_names(sent_arrays(reference, request.lora.lora_variant))
        if update is None:
            return _to_sum(msg, reply.content, np.zeros(_size(reference, names)), 0)
        vector, clamped = encode(record_to_arrays(update), reference, names, request,
                                 threshold=int(protocol["threshold"]), target=int(protocol["target_range"]))
        if clamped:
            log.warning("secure round: %d coordinate(s) of the update were beyond the secure sum's range and "
                        "clamped (the server sees the count)", clamped)
        return _to_sum(msg, reply.content, vector, clamped)

    return handle


def _size(reference: Arrays, names: list[str] | None) -> int:
    return sum(reference[n].size for n in (names if names is not None else reference))


def encode(update: Arrays, reference: Arrays, names: list[str], request: RoundRequest, *, threshold: int,
           target: int) -> tuple[np.ndarray, int]:
    """The node's update on the secure sum's grid (float64 values g * z, shape (d,)) and the clamped count.

    delta = update - reference over ``names``; under client-dp clipped to client-clip-norm; divided by the grid
    step g and rounded without bias; under client-dp plus the node's Skellam share (integer noise); clamped to
    the range the sum carries. All randomness is the node's own (``secrets``).
    """
    agg = request.aggregation
    g = step(value_range(agg, request.plan, request.privacy), target)
    delta = flatten(update, names) - flatten(reference, names)
    rng = np.random.default_rng(secrets.randbits(128))
    if agg.client_dp:
        norm = float(np.linalg.norm(delta))
        delta = delta * min(1.0, agg.client_clip_norm / norm) if norm > 0 and math.isfinite(norm) else delta * 0.0
    z = randomised_round(delta / g, rng)
    if agg.client_dp:
        share = SkellamShare.plan(clip_norm=agg.client_clip_norm, step=g, dim=z.size,
                                  noise_multiplier=agg.client_noise_multiplier, threshold=threshold)
        z = z + share.sample(z.size, rng)
    z, clamped = clamp(z, target)
    return z.astype(np.float64) * g, clamped


def _to_sum(msg: Message, content: RecordDict, vector: np.ndarray, clamped: int) -> Message:
    """The reply the SecAgg+ mod masks: the vector as FitRes parameters (weight 1), beside the contract's fields."""
    fitres = FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters([vector]), num_examples=1,
                    metrics={"clamped": clamped})
    legacy = fitres_to_recorddict(fitres, keep_input=False)
    for key, record in legacy.items():
        content[key] = record
    content.array_records.pop(ARRAYS, None)
    return Message(content, reply_to=msg)
