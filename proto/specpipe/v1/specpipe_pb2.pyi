from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_UNSPECIFIED: _ClassVar[Mode]
    MODE_AUTOREGRESSIVE: _ClassVar[Mode]
    MODE_SEQUENTIAL: _ClassVar[Mode]
    MODE_PIPELINED: _ClassVar[Mode]
    MODE_SPECBRANCH: _ClassVar[Mode]
MODE_UNSPECIFIED: Mode
MODE_AUTOREGRESSIVE: Mode
MODE_SEQUENTIAL: Mode
MODE_PIPELINED: Mode
MODE_SPECBRANCH: Mode

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompt", "prompt_ids", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "mode", "drafter_invariant")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    DRAFTER_INVARIANT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt: str
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    mode: Mode
    drafter_invariant: bool
    def __init__(self, request_id: _Optional[str] = ..., prompt: _Optional[str] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., mode: _Optional[_Union[Mode, str]] = ..., drafter_invariant: _Optional[bool] = ...) -> None: ...

class RequestStats(_message.Message):
    __slots__ = ("draft_tokens", "accepted_tokens", "rolled_back_tokens", "verifications", "branches_forked", "branches_hit", "time_to_first_token_s", "tokens_per_second", "mean_accepted_length", "acceptance_rate", "generated_tokens", "mode", "target_busy_fraction", "drafted_tokens", "batch_wait_s", "rejections", "main_rolled_back_tokens", "rejections_at_fork", "branch_rank_tried", "branch_rank_hits", "prepared_hits", "filled_tokens", "kept_tokens")
    DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ROLLED_BACK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    VERIFICATIONS_FIELD_NUMBER: _ClassVar[int]
    BRANCHES_FORKED_FIELD_NUMBER: _ClassVar[int]
    BRANCHES_HIT_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_S_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    MEAN_ACCEPTED_LENGTH_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_RATE_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    TARGET_BUSY_FRACTION_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BATCH_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    REJECTIONS_FIELD_NUMBER: _ClassVar[int]
    MAIN_ROLLED_BACK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REJECTIONS_AT_FORK_FIELD_NUMBER: _ClassVar[int]
    BRANCH_RANK_TRIED_FIELD_NUMBER: _ClassVar[int]
    BRANCH_RANK_HITS_FIELD_NUMBER: _ClassVar[int]
    PREPARED_HITS_FIELD_NUMBER: _ClassVar[int]
    FILLED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KEPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    draft_tokens: int
    accepted_tokens: int
    rolled_back_tokens: int
    verifications: int
    branches_forked: int
    branches_hit: int
    time_to_first_token_s: float
    tokens_per_second: float
    mean_accepted_length: float
    acceptance_rate: float
    generated_tokens: int
    mode: Mode
    target_busy_fraction: float
    drafted_tokens: int
    batch_wait_s: float
    rejections: int
    main_rolled_back_tokens: int
    rejections_at_fork: int
    branch_rank_tried: _containers.RepeatedScalarFieldContainer[int]
    branch_rank_hits: _containers.RepeatedScalarFieldContainer[int]
    prepared_hits: int
    filled_tokens: int
    kept_tokens: int
    def __init__(self, draft_tokens: _Optional[int] = ..., accepted_tokens: _Optional[int] = ..., rolled_back_tokens: _Optional[int] = ..., verifications: _Optional[int] = ..., branches_forked: _Optional[int] = ..., branches_hit: _Optional[int] = ..., time_to_first_token_s: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., mean_accepted_length: _Optional[float] = ..., acceptance_rate: _Optional[float] = ..., generated_tokens: _Optional[int] = ..., mode: _Optional[_Union[Mode, str]] = ..., target_busy_fraction: _Optional[float] = ..., drafted_tokens: _Optional[int] = ..., batch_wait_s: _Optional[float] = ..., rejections: _Optional[int] = ..., main_rolled_back_tokens: _Optional[int] = ..., rejections_at_fork: _Optional[int] = ..., branch_rank_tried: _Optional[_Iterable[int]] = ..., branch_rank_hits: _Optional[_Iterable[int]] = ..., prepared_hits: _Optional[int] = ..., filled_tokens: _Optional[int] = ..., kept_tokens: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "token_ids", "text", "finish_reason", "stats")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    finish_reason: str
    stats: RequestStats
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., finish_reason: _Optional[str] = ..., stats: _Optional[_Union[RequestStats, _Mapping]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStats(_message.Message):
    __slots__ = ("role", "healthy", "live_requests", "live_branches", "busy_fraction", "status", "pid", "kv_slots", "kv_slots_used", "kv_slot_len", "last_batch_rows", "last_batch_tokens", "forwards", "forward_rows", "forward_tokens", "setup")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    LIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    LIVE_BRANCHES_FIELD_NUMBER: _ClassVar[int]
    BUSY_FRACTION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    KV_SLOTS_FIELD_NUMBER: _ClassVar[int]
    KV_SLOTS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_SLOT_LEN_FIELD_NUMBER: _ClassVar[int]
    LAST_BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    LAST_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FORWARDS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_ROWS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SETUP_FIELD_NUMBER: _ClassVar[int]
    role: str
    healthy: bool
    live_requests: int
    live_branches: int
    busy_fraction: float
    status: str
    pid: int
    kv_slots: int
    kv_slots_used: int
    kv_slot_len: int
    last_batch_rows: int
    last_batch_tokens: int
    forwards: int
    forward_rows: int
    forward_tokens: int
    setup: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, role: _Optional[str] = ..., healthy: _Optional[bool] = ..., live_requests: _Optional[int] = ..., live_branches: _Optional[int] = ..., busy_fraction: _Optional[float] = ..., status: _Optional[str] = ..., pid: _Optional[int] = ..., kv_slots: _Optional[int] = ..., kv_slots_used: _Optional[int] = ..., kv_slot_len: _Optional[int] = ..., last_batch_rows: _Optional[int] = ..., last_batch_tokens: _Optional[int] = ..., forwards: _Optional[int] = ..., forward_rows: _Optional[int] = ..., forward_tokens: _Optional[int] = ..., setup: _Optional[_Iterable[str]] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("live_requests", "workers", "totals", "finished", "default_mode", "status", "policy")
    class FinishedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    LIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    TOTALS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    live_requests: int
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStats]
    totals: RequestStats
    finished: _containers.ScalarMap[str, int]
    default_mode: Mode
    status: str
    policy: PolicyState
    def __init__(self, live_requests: _Optional[int] = ..., workers: _Optional[_Iterable[_Union[WorkerStats, _Mapping]]] = ..., totals: _Optional[_Union[RequestStats, _Mapping]] = ..., finished: _Optional[_Mapping[str, int]] = ..., default_mode: _Optional[_Union[Mode, str]] = ..., status: _Optional[str] = ..., policy: _Optional[_Union[PolicyState, _Mapping]] = ...) -> None: ...

class PolicyState(_message.Message):
    __slots__ = ("acceptance_rate", "draft_step_s", "verify_s", "branch_threshold", "branch_threshold_learnt", "rejections_seen", "sampled_branch_threshold", "fork_hit_rate", "sampled_fork_hit_rate", "sampled_acceptance_rate")
    ACCEPTANCE_RATE_FIELD_NUMBER: _ClassVar[int]
    DRAFT_STEP_S_FIELD_NUMBER: _ClassVar[int]
    VERIFY_S_FIELD_NUMBER: _ClassVar[int]
    BRANCH_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    BRANCH_THRESHOLD_LEARNT_FIELD_NUMBER: _ClassVar[int]
    REJECTIONS_SEEN_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_BRANCH_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    FORK_HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_FORK_HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_ACCEPTANCE_RATE_FIELD_NUMBER: _ClassVar[int]
    acceptance_rate: float
    draft_step_s: float
    verify_s: float
    branch_threshold: float
    branch_threshold_learnt: bool
    rejections_seen: int
    sampled_branch_threshold: float
    fork_hit_rate: float
    sampled_fork_hit_rate: float
    sampled_acceptance_rate: float
    def __init__(self, acceptance_rate: _Optional[float] = ..., draft_step_s: _Optional[float] = ..., verify_s: _Optional[float] = ..., branch_threshold: _Optional[float] = ..., branch_threshold_learnt: _Optional[bool] = ..., rejections_seen: _Optional[int] = ..., sampled_branch_threshold: _Optional[float] = ..., fork_hit_rate: _Optional[float] = ..., sampled_fork_hit_rate: _Optional[float] = ..., sampled_acceptance_rate: _Optional[float] = ...) -> None: ...
