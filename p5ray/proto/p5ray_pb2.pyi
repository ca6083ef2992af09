from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScoredItem(_message.Message):
    __slots__ = ("item_id", "score")
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    item_id: str
    score: float
    def __init__(self, item_id: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class RecommendRequest(_message.Message):
    __slots__ = ("user_id", "history", "k")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    history: _containers.RepeatedScalarFieldContainer[str]
    k: int
    def __init__(self, user_id: _Optional[str] = ..., history: _Optional[_Iterable[str]] = ..., k: _Optional[int] = ...) -> None: ...

class RecallRequest(_message.Message):
    __slots__ = ("user_id", "history", "k")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    history: _containers.RepeatedScalarFieldContainer[str]
    k: int
    def __init__(self, user_id: _Optional[str] = ..., history: _Optional[_Iterable[str]] = ..., k: _Optional[int] = ...) -> None: ...

class RankRequest(_message.Message):
    __slots__ = ("user_id", "history", "candidates")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    history: _containers.RepeatedScalarFieldContainer[str]
    candidates: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, user_id: _Optional[str] = ..., history: _Optional[_Iterable[str]] = ..., candidates: _Optional[_Iterable[str]] = ...) -> None: ...

class CrossSellRequest(_message.Message):
    __slots__ = ("item_ids", "k")
    ITEM_IDS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    item_ids: _containers.RepeatedScalarFieldContainer[str]
    k: int
    def __init__(self, item_ids: _Optional[_Iterable[str]] = ..., k: _Optional[int] = ...) -> None: ...

class RatingRequest(_message.Message):
    __slots__ = ("user_id", "item_id", "history")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_ID_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    item_id: str
    history: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, user_id: _Optional[str] = ..., item_id: _Optional[str] = ..., history: _Optional[_Iterable[str]] = ...) -> None: ...

class ItemsResponse(_message.Message):
    __slots__ = ("items", "cold_start", "ignored", "model_version")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    COLD_START_FIELD_NUMBER: _ClassVar[int]
    IGNORED_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    cold_start: bool
    ignored: _containers.RepeatedScalarFieldContainer[str]
    model_version: str
    def __init__(self, items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., cold_start: _Optional[bool] = ..., ignored: _Optional[_Iterable[str]] = ..., model_version: _Optional[str] = ...) -> None: ...

class RecommendResponse(_message.Message):
    __slots__ = ("items", "cross_sell", "cold_start", "ignored", "model_version")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    CROSS_SELL_FIELD_NUMBER: _ClassVar[int]
    COLD_START_FIELD_NUMBER: _ClassVar[int]
    IGNORED_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    cross_sell: _containers.RepeatedCompositeFieldContainer[ScoredItem]
    cold_start: bool
    ignored: _containers.RepeatedScalarFieldContainer[str]
    model_version: str
    def __init__(self, items: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., cross_sell: _Optional[_Iterable[_Union[ScoredItem, _Mapping]]] = ..., cold_start: _Optional[bool] = ..., ignored: _Optional[_Iterable[str]] = ..., model_version: _Optional[str] = ...) -> None: ...

class RatingResponse(_message.Message):
    __slots__ = ("rating", "model_version")
    RATING_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    rating: float
    model_version: str
    def __init__(self, rating: _Optional[float] = ..., model_version: _Optional[str] = ...) -> None: ...
