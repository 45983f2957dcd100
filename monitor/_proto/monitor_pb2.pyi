from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_F32: _ClassVar[DType]
    DTYPE_F16: _ClassVar[DType]
    DTYPE_BF16: _ClassVar[DType]

class Severity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEVERITY_UNSPECIFIED: _ClassVar[Severity]
    SEVERITY_INFO: _ClassVar[Severity]
    SEVERITY_WARNING: _ClassVar[Severity]
    SEVERITY_CRITICAL: _ClassVar[Severity]

class Advice(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADVICE_UNSPECIFIED: _ClassVar[Advice]
    ADVICE_CONTINUE: _ClassVar[Advice]
    ADVICE_HALT: _ClassVar[Advice]
DTYPE_UNSPECIFIED: DType
DTYPE_F32: DType
DTYPE_F16: DType
DTYPE_BF16: DType
SEVERITY_UNSPECIFIED: Severity
SEVERITY_INFO: Severity
SEVERITY_WARNING: Severity
SEVERITY_CRITICAL: Severity
ADVICE_UNSPECIFIED: Advice
ADVICE_CONTINUE: Advice
ADVICE_HALT: Advice

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ActivationBlock(_message.Message):
    __slots__ = ("hook_point", "activations", "projected")
    HOOK_POINT_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    PROJECTED_FIELD_NUMBER: _ClassVar[int]
    hook_point: str
    activations: Tensor
    projected: bool
    def __init__(self, hook_point: _Optional[str] = ..., activations: _Optional[_Union[Tensor, _Mapping]] = ..., projected: _Optional[bool] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("request_id", "model", "prompt", "output", "activations", "labels", "decision", "traceparent")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    prompt: str
    output: str
    activations: _containers.RepeatedCompositeFieldContainer[ActivationBlock]
    labels: _containers.ScalarMap[str, str]
    decision: _containers.RepeatedCompositeFieldContainer[ActivationBlock]
    traceparent: str
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., prompt: _Optional[str] = ..., output: _Optional[str] = ..., activations: _Optional[_Iterable[_Union[ActivationBlock, _Mapping]]] = ..., labels: _Optional[_Mapping[str, str]] = ..., decision: _Optional[_Iterable[_Union[ActivationBlock, _Mapping]]] = ..., traceparent: _Optional[str] = ...) -> None: ...

class FeatureContribution(_message.Message):
    __slots__ = ("latent", "activation", "contribution", "label", "example")
    LATENT_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_FIELD_NUMBER: _ClassVar[int]
    latent: int
    activation: float
    contribution: float
    label: str
    example: str
    def __init__(self, latent: _Optional[int] = ..., activation: _Optional[float] = ..., contribution: _Optional[float] = ..., label: _Optional[str] = ..., example: _Optional[str] = ...) -> None: ...

class DetectorScore(_message.Message):
    __slots__ = ("detector", "behaviour", "score", "probability", "threshold", "fired", "severity", "top_features", "recent_score", "critical")
    DETECTOR_FIELD_NUMBER: _ClassVar[int]
    BEHAVIOUR_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    FIRED_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    TOP_FEATURES_FIELD_NUMBER: _ClassVar[int]
    RECENT_SCORE_FIELD_NUMBER: _ClassVar[int]
    CRITICAL_FIELD_NUMBER: _ClassVar[int]
    detector: str
    behaviour: str
    score: float
    probability: float
    threshold: float
    fired: bool
    severity: Severity
    top_features: _containers.RepeatedCompositeFieldContainer[FeatureContribution]
    recent_score: float
    critical: bool
    def __init__(self, detector: _Optional[str] = ..., behaviour: _Optional[str] = ..., score: _Optional[float] = ..., probability: _Optional[float] = ..., threshold: _Optional[float] = ..., fired: _Optional[bool] = ..., severity: _Optional[_Union[Severity, str]] = ..., top_features: _Optional[_Iterable[_Union[FeatureContribution, _Mapping]]] = ..., recent_score: _Optional[float] = ..., critical: _Optional[bool] = ...) -> None: ...

class HookStats(_message.Message):
    __slots__ = ("hook_point", "tokens", "mean_l2_norm", "max_l2_norm")
    HOOK_POINT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    MEAN_L2_NORM_FIELD_NUMBER: _ClassVar[int]
    MAX_L2_NORM_FIELD_NUMBER: _ClassVar[int]
    hook_point: str
    tokens: int
    mean_l2_norm: float
    max_l2_norm: float
    def __init__(self, hook_point: _Optional[str] = ..., tokens: _Optional[int] = ..., mean_l2_norm: _Optional[float] = ..., max_l2_norm: _Optional[float] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("request_id", "hook_stats", "text_stats", "detectors", "flagged", "server_seconds")
    class TextStatsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    HOOK_STATS_FIELD_NUMBER: _ClassVar[int]
    TEXT_STATS_FIELD_NUMBER: _ClassVar[int]
    DETECTORS_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_FIELD_NUMBER: _ClassVar[int]
    SERVER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    hook_stats: _containers.RepeatedCompositeFieldContainer[HookStats]
    text_stats: _containers.ScalarMap[str, float]
    detectors: _containers.RepeatedCompositeFieldContainer[DetectorScore]
    flagged: bool
    server_seconds: float
    def __init__(self, request_id: _Optional[str] = ..., hook_stats: _Optional[_Iterable[_Union[HookStats, _Mapping]]] = ..., text_stats: _Optional[_Mapping[str, float]] = ..., detectors: _Optional[_Iterable[_Union[DetectorScore, _Mapping]]] = ..., flagged: _Optional[bool] = ..., server_seconds: _Optional[float] = ...) -> None: ...

class ScoreChunk(_message.Message):
    __slots__ = ("request_id", "model", "prompt", "text_delta", "activations", "labels", "final", "decision", "traceparent")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TEXT_DELTA_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    prompt: str
    text_delta: str
    activations: _containers.RepeatedCompositeFieldContainer[ActivationBlock]
    labels: _containers.ScalarMap[str, str]
    final: bool
    decision: _containers.RepeatedCompositeFieldContainer[ActivationBlock]
    traceparent: str
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., prompt: _Optional[str] = ..., text_delta: _Optional[str] = ..., activations: _Optional[_Iterable[_Union[ActivationBlock, _Mapping]]] = ..., labels: _Optional[_Mapping[str, str]] = ..., final: _Optional[bool] = ..., decision: _Optional[_Iterable[_Union[ActivationBlock, _Mapping]]] = ..., traceparent: _Optional[str] = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("request_id", "chunk_index", "tokens_seen", "hook_stats", "text_stats", "detectors", "advice", "reason", "final")
    class TextStatsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKENS_SEEN_FIELD_NUMBER: _ClassVar[int]
    HOOK_STATS_FIELD_NUMBER: _ClassVar[int]
    TEXT_STATS_FIELD_NUMBER: _ClassVar[int]
    DETECTORS_FIELD_NUMBER: _ClassVar[int]
    ADVICE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    chunk_index: int
    tokens_seen: int
    hook_stats: _containers.RepeatedCompositeFieldContainer[HookStats]
    text_stats: _containers.ScalarMap[str, float]
    detectors: _containers.RepeatedCompositeFieldContainer[DetectorScore]
    advice: Advice
    reason: str
    final: bool
    def __init__(self, request_id: _Optional[str] = ..., chunk_index: _Optional[int] = ..., tokens_seen: _Optional[int] = ..., hook_stats: _Optional[_Iterable[_Union[HookStats, _Mapping]]] = ..., text_stats: _Optional[_Mapping[str, float]] = ..., detectors: _Optional[_Iterable[_Union[DetectorScore, _Mapping]]] = ..., advice: _Optional[_Union[Advice, str]] = ..., reason: _Optional[str] = ..., final: _Optional[bool] = ...) -> None: ...

class IngestError(_message.Message):
    __slots__ = ("index", "request_id", "message")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    index: int
    request_id: str
    message: str
    def __init__(self, index: _Optional[int] = ..., request_id: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class IngestSummary(_message.Message):
    __slots__ = ("received", "accepted", "rejected", "flagged", "errors")
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    received: int
    accepted: int
    rejected: int
    flagged: int
    errors: _containers.RepeatedCompositeFieldContainer[IngestError]
    def __init__(self, received: _Optional[int] = ..., accepted: _Optional[int] = ..., rejected: _Optional[int] = ..., flagged: _Optional[int] = ..., errors: _Optional[_Iterable[_Union[IngestError, _Mapping]]] = ...) -> None: ...

class GetDetectorsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EncoderSlice(_message.Message):
    __slots__ = ("latent_ids", "w_enc", "b_enc", "b_dec", "apply_b_dec_to_input", "dense_columns")
    LATENT_IDS_FIELD_NUMBER: _ClassVar[int]
    W_ENC_FIELD_NUMBER: _ClassVar[int]
    B_ENC_FIELD_NUMBER: _ClassVar[int]
    B_DEC_FIELD_NUMBER: _ClassVar[int]
    APPLY_B_DEC_TO_INPUT_FIELD_NUMBER: _ClassVar[int]
    DENSE_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    latent_ids: _containers.RepeatedScalarFieldContainer[int]
    w_enc: Tensor
    b_enc: Tensor
    b_dec: Tensor
    apply_b_dec_to_input: bool
    dense_columns: int
    def __init__(self, latent_ids: _Optional[_Iterable[int]] = ..., w_enc: _Optional[_Union[Tensor, _Mapping]] = ..., b_enc: _Optional[_Union[Tensor, _Mapping]] = ..., b_dec: _Optional[_Union[Tensor, _Mapping]] = ..., apply_b_dec_to_input: _Optional[bool] = ..., dense_columns: _Optional[int] = ...) -> None: ...

class HookPointSpec(_message.Message):
    __slots__ = ("name", "d_model", "max_tokens", "accepted_dtypes", "encoder_slice")
    NAME_FIELD_NUMBER: _ClassVar[int]
    D_MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_DTYPES_FIELD_NUMBER: _ClassVar[int]
    ENCODER_SLICE_FIELD_NUMBER: _ClassVar[int]
    name: str
    d_model: int
    max_tokens: int
    accepted_dtypes: _containers.RepeatedScalarFieldContainer[DType]
    encoder_slice: EncoderSlice
    def __init__(self, name: _Optional[str] = ..., d_model: _Optional[int] = ..., max_tokens: _Optional[int] = ..., accepted_dtypes: _Optional[_Iterable[_Union[DType, str]]] = ..., encoder_slice: _Optional[_Union[EncoderSlice, _Mapping]] = ...) -> None: ...

class DetectorInfo(_message.Message):
    __slots__ = ("name", "behaviour", "kind", "hook_point", "threshold", "critical", "aggregation", "target_fpr", "latent_ids")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BEHAVIOUR_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    HOOK_POINT_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    CRITICAL_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    TARGET_FPR_FIELD_NUMBER: _ClassVar[int]
    LATENT_IDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    behaviour: str
    kind: str
    hook_point: str
    threshold: float
    critical: bool
    aggregation: str
    target_fpr: float
    latent_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., behaviour: _Optional[str] = ..., kind: _Optional[str] = ..., hook_point: _Optional[str] = ..., threshold: _Optional[float] = ..., critical: _Optional[bool] = ..., aggregation: _Optional[str] = ..., target_fpr: _Optional[float] = ..., latent_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class DetectorCatalog(_message.Message):
    __slots__ = ("model", "bundle_name", "bundle_version", "hook_points", "detectors")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_NAME_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    HOOK_POINTS_FIELD_NUMBER: _ClassVar[int]
    DETECTORS_FIELD_NUMBER: _ClassVar[int]
    model: str
    bundle_name: str
    bundle_version: str
    hook_points: _containers.RepeatedCompositeFieldContainer[HookPointSpec]
    detectors: _containers.RepeatedCompositeFieldContainer[DetectorInfo]
    def __init__(self, model: _Optional[str] = ..., bundle_name: _Optional[str] = ..., bundle_version: _Optional[str] = ..., hook_points: _Optional[_Iterable[_Union[HookPointSpec, _Mapping]]] = ..., detectors: _Optional[_Iterable[_Union[DetectorInfo, _Mapping]]] = ...) -> None: ...
