from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "frame")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    frame: int
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., frame: _Optional[int] = ...) -> None: ...

class Sampling(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "seed", "drafter_invariant", "noise_vocab")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DRAFTER_INVARIANT_FIELD_NUMBER: _ClassVar[int]
    NOISE_VOCAB_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    drafter_invariant: bool
    noise_vocab: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., drafter_invariant: _Optional[bool] = ..., noise_vocab: _Optional[int] = ...) -> None: ...

class Prefill(_message.Message):
    __slots__ = ("request_id", "token_ids", "sampling", "handle", "hold_seconds")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    HANDLE_FIELD_NUMBER: _ClassVar[int]
    HOLD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: Sampling
    handle: int
    hold_seconds: float
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[Sampling, _Mapping]] = ..., handle: _Optional[int] = ..., hold_seconds: _Optional[float] = ...) -> None: ...

class Draft(_message.Message):
    __slots__ = ("request_id", "branch_ids", "epoch", "max_tokens", "min_confidence", "num_candidates", "send_probs", "report_when_done", "report_in_s", "end_position", "reports_only")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BRANCH_IDS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MIN_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    NUM_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    SEND_PROBS_FIELD_NUMBER: _ClassVar[int]
    REPORT_WHEN_DONE_FIELD_NUMBER: _ClassVar[int]
    REPORT_IN_S_FIELD_NUMBER: _ClassVar[int]
    END_POSITION_FIELD_NUMBER: _ClassVar[int]
    REPORTS_ONLY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    branch_ids: _containers.RepeatedScalarFieldContainer[int]
    epoch: int
    max_tokens: int
    min_confidence: float
    num_candidates: int
    send_probs: bool
    report_when_done: bool
    report_in_s: float
    end_position: int
    reports_only: bool
    def __init__(self, request_id: _Optional[str] = ..., branch_ids: _Optional[_Iterable[int]] = ..., epoch: _Optional[int] = ..., max_tokens: _Optional[int] = ..., min_confidence: _Optional[float] = ..., num_candidates: _Optional[int] = ..., send_probs: _Optional[bool] = ..., report_when_done: _Optional[bool] = ..., report_in_s: _Optional[float] = ..., end_position: _Optional[int] = ..., reports_only: _Optional[bool] = ...) -> None: ...

class Fork(_message.Message):
    __slots__ = ("request_id", "parent_branch_id", "branch_id", "position", "token_ids")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PARENT_BRANCH_ID_FIELD_NUMBER: _ClassVar[int]
    BRANCH_ID_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    parent_branch_id: int
    branch_id: int
    position: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., parent_branch_id: _Optional[int] = ..., branch_id: _Optional[int] = ..., position: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Sync(_message.Message):
    __slots__ = ("request_id", "branch_id", "keep_length", "append_token_ids")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BRANCH_ID_FIELD_NUMBER: _ClassVar[int]
    KEEP_LENGTH_FIELD_NUMBER: _ClassVar[int]
    APPEND_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    branch_id: int
    keep_length: int
    append_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., branch_id: _Optional[int] = ..., keep_length: _Optional[int] = ..., append_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Cancel(_message.Message):
    __slots__ = ("request_id", "branch_ids")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BRANCH_IDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    branch_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., branch_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Verify(_message.Message):
    __slots__ = ("request_id", "block_id", "start_length", "draft_token_ids", "branch_id", "epoch", "emit_bonus", "want_features", "want_prediction", "expect_last_token", "after_block_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_ID_FIELD_NUMBER: _ClassVar[int]
    START_LENGTH_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    BRANCH_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    EMIT_BONUS_FIELD_NUMBER: _ClassVar[int]
    WANT_FEATURES_FIELD_NUMBER: _ClassVar[int]
    WANT_PREDICTION_FIELD_NUMBER: _ClassVar[int]
    EXPECT_LAST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    AFTER_BLOCK_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    block_id: int
    start_length: int
    draft_token_ids: _containers.RepeatedScalarFieldContainer[int]
    branch_id: int
    epoch: int
    emit_bonus: bool
    want_features: bool
    want_prediction: bool
    expect_last_token: int
    after_block_id: int
    def __init__(self, request_id: _Optional[str] = ..., block_id: _Optional[int] = ..., start_length: _Optional[int] = ..., draft_token_ids: _Optional[_Iterable[int]] = ..., branch_id: _Optional[int] = ..., epoch: _Optional[int] = ..., emit_bonus: _Optional[bool] = ..., want_features: _Optional[bool] = ..., want_prediction: _Optional[bool] = ..., expect_last_token: _Optional[int] = ..., after_block_id: _Optional[int] = ...) -> None: ...

class Decode(_message.Message):
    __slots__ = ("request_id", "max_length", "until_block")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    UNTIL_BLOCK_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    max_length: int
    until_block: bool
    def __init__(self, request_id: _Optional[str] = ..., max_length: _Optional[int] = ..., until_block: _Optional[bool] = ...) -> None: ...

class Release(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class Ping(_message.Message):
    __slots__ = ("nonce",)
    NONCE_FIELD_NUMBER: _ClassVar[int]
    nonce: int
    def __init__(self, nonce: _Optional[int] = ...) -> None: ...

class Command(_message.Message):
    __slots__ = ("batch", "prefill", "draft", "fork", "sync", "cancel", "verify", "release", "ping", "decode")
    BATCH_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FIELD_NUMBER: _ClassVar[int]
    FORK_FIELD_NUMBER: _ClassVar[int]
    SYNC_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    VERIFY_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    PING_FIELD_NUMBER: _ClassVar[int]
    DECODE_FIELD_NUMBER: _ClassVar[int]
    batch: Commands
    prefill: Prefill
    draft: Draft
    fork: Fork
    sync: Sync
    cancel: Cancel
    verify: Verify
    release: Release
    ping: Ping
    decode: Decode
    def __init__(self, batch: _Optional[_Union[Commands, _Mapping]] = ..., prefill: _Optional[_Union[Prefill, _Mapping]] = ..., draft: _Optional[_Union[Draft, _Mapping]] = ..., fork: _Optional[_Union[Fork, _Mapping]] = ..., sync: _Optional[_Union[Sync, _Mapping]] = ..., cancel: _Optional[_Union[Cancel, _Mapping]] = ..., verify: _Optional[_Union[Verify, _Mapping]] = ..., release: _Optional[_Union[Release, _Mapping]] = ..., ping: _Optional[_Union[Ping, _Mapping]] = ..., decode: _Optional[_Union[Decode, _Mapping]] = ...) -> None: ...

class Commands(_message.Message):
    __slots__ = ("commands",)
    COMMANDS_FIELD_NUMBER: _ClassVar[int]
    commands: _containers.RepeatedCompositeFieldContainer[Command]
    def __init__(self, commands: _Optional[_Iterable[_Union[Command, _Mapping]]] = ...) -> None: ...

class DraftToken(_message.Message):
    __slots__ = ("request_id", "branch_id", "epoch", "position", "token_id", "prob", "candidate_ids", "candidate_probs", "last")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BRANCH_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    PROB_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_IDS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_PROBS_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    branch_id: int
    epoch: int
    position: int
    token_id: int
    prob: float
    candidate_ids: _containers.RepeatedScalarFieldContainer[int]
    candidate_probs: _containers.RepeatedScalarFieldContainer[float]
    last: bool
    def __init__(self, request_id: _Optional[str] = ..., branch_id: _Optional[int] = ..., epoch: _Optional[int] = ..., position: _Optional[int] = ..., token_id: _Optional[int] = ..., prob: _Optional[float] = ..., candidate_ids: _Optional[_Iterable[int]] = ..., candidate_probs: _Optional[_Iterable[float]] = ..., last: _Optional[bool] = ...) -> None: ...

class DraftStep(_message.Message):
    __slots__ = ("tokens", "step_seconds", "batch_branches", "batch_tokens")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BATCH_BRANCHES_FIELD_NUMBER: _ClassVar[int]
    BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[DraftToken]
    step_seconds: float
    batch_branches: int
    batch_tokens: int
    def __init__(self, tokens: _Optional[_Iterable[_Union[DraftToken, _Mapping]]] = ..., step_seconds: _Optional[float] = ..., batch_branches: _Optional[int] = ..., batch_tokens: _Optional[int] = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("request_id", "block_id", "num_accepted", "next_token_id", "committed_length", "features", "verify_seconds", "predicted_accept_length", "stale", "prefill_seconds", "queue_seconds", "decoded")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_LENGTH_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    VERIFY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_ACCEPT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    PREFILL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DECODED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    block_id: int
    num_accepted: int
    next_token_id: int
    committed_length: int
    features: Tensor
    verify_seconds: float
    predicted_accept_length: float
    stale: bool
    prefill_seconds: float
    queue_seconds: float
    decoded: bool
    def __init__(self, request_id: _Optional[str] = ..., block_id: _Optional[int] = ..., num_accepted: _Optional[int] = ..., next_token_id: _Optional[int] = ..., committed_length: _Optional[int] = ..., features: _Optional[_Union[Tensor, _Mapping]] = ..., verify_seconds: _Optional[float] = ..., predicted_accept_length: _Optional[float] = ..., stale: _Optional[bool] = ..., prefill_seconds: _Optional[float] = ..., queue_seconds: _Optional[float] = ..., decoded: _Optional[bool] = ...) -> None: ...

class Verdicts(_message.Message):
    __slots__ = ("verdicts", "batch_requests", "batch_tokens", "forward_seconds")
    VERDICTS_FIELD_NUMBER: _ClassVar[int]
    BATCH_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    verdicts: _containers.RepeatedCompositeFieldContainer[Verdict]
    batch_requests: int
    batch_tokens: int
    forward_seconds: float
    def __init__(self, verdicts: _Optional[_Iterable[_Union[Verdict, _Mapping]]] = ..., batch_requests: _Optional[int] = ..., batch_tokens: _Optional[int] = ..., forward_seconds: _Optional[float] = ...) -> None: ...

class Pong(_message.Message):
    __slots__ = ("nonce", "role", "live_requests", "live_branches", "busy_seconds", "uptime_seconds", "pid", "kv_slots", "kv_slots_used", "kv_slot_len", "last_batch_rows", "last_batch_tokens", "setup")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    LIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    LIVE_BRANCHES_FIELD_NUMBER: _ClassVar[int]
    BUSY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    KV_SLOTS_FIELD_NUMBER: _ClassVar[int]
    KV_SLOTS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_SLOT_LEN_FIELD_NUMBER: _ClassVar[int]
    LAST_BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    LAST_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SETUP_FIELD_NUMBER: _ClassVar[int]
    nonce: int
    role: str
    live_requests: int
    live_branches: int
    busy_seconds: float
    uptime_seconds: float
    pid: int
    kv_slots: int
    kv_slots_used: int
    kv_slot_len: int
    last_batch_rows: int
    last_batch_tokens: int
    setup: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, nonce: _Optional[int] = ..., role: _Optional[str] = ..., live_requests: _Optional[int] = ..., live_branches: _Optional[int] = ..., busy_seconds: _Optional[float] = ..., uptime_seconds: _Optional[float] = ..., pid: _Optional[int] = ..., kv_slots: _Optional[int] = ..., kv_slots_used: _Optional[int] = ..., kv_slot_len: _Optional[int] = ..., last_batch_rows: _Optional[int] = ..., last_batch_tokens: _Optional[int] = ..., setup: _Optional[_Iterable[str]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("request_id", "message", "command")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    message: str
    command: str
    def __init__(self, request_id: _Optional[str] = ..., message: _Optional[str] = ..., command: _Optional[str] = ...) -> None: ...

class DraftProbs(_message.Message):
    __slots__ = ("handles", "branch_ids", "epochs", "positions", "probs")
    HANDLES_FIELD_NUMBER: _ClassVar[int]
    BRANCH_IDS_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    handles: _containers.RepeatedScalarFieldContainer[int]
    branch_ids: _containers.RepeatedScalarFieldContainer[int]
    epochs: _containers.RepeatedScalarFieldContainer[int]
    positions: _containers.RepeatedScalarFieldContainer[int]
    probs: Tensor
    def __init__(self, handles: _Optional[_Iterable[int]] = ..., branch_ids: _Optional[_Iterable[int]] = ..., epochs: _Optional[_Iterable[int]] = ..., positions: _Optional[_Iterable[int]] = ..., probs: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Reply(_message.Message):
    __slots__ = ("draft_step", "verdicts", "pong", "error")
    DRAFT_STEP_FIELD_NUMBER: _ClassVar[int]
    VERDICTS_FIELD_NUMBER: _ClassVar[int]
    PONG_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    draft_step: DraftStep
    verdicts: Verdicts
    pong: Pong
    error: Error
    def __init__(self, draft_step: _Optional[_Union[DraftStep, _Mapping]] = ..., verdicts: _Optional[_Union[Verdicts, _Mapping]] = ..., pong: _Optional[_Union[Pong, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...
