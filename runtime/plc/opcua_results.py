"""ResultManagement's result retrieval (OPC 40100-1 7.10): the recent results of the run, and the types
they are handed out in.

A client whose session ended while it was away (an outage longer than its session timeout ends the
session and its subscription, with the ResultReady events of that gap) asks ``GetResultListFiltered``
for what it missed, or ``GetResultById`` for one result. The results are kept in memory, the last
``RESULT_HISTORY`` of the run: an older one is gone (GetResultById answers BadNotFound), and a restart
of mrkd starts with none.

The types are the Machine Vision nodeset's structures, rebuilt field for field in mrkd's namespace
(``build_result_types``): ResultDataType and the id structures its fields and the methods' inputs are
(ResultIdDataType, PartIdDataType, ...), ProcessingTimesDataType and ResultStateDataType (an Int32);
its TrimmedString and Handle are OPC 10000-5's (1.05 has them, in namespace 0). The nodeset's abstract
BinaryIdBaseDataType is not built: its three subtypes (RecipeIdExternalDataType, RecipeIdInternalDataType,
ConfigurationIdDataType) are structures of their own with its fields.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Deque, Dict, Optional

RESULT_HISTORY = 1000       # results of the run held for GetResultById / GetResultListFiltered
MAX_LIST_RESULTS = 100      # results one GetResultListFiltered answer carries at most (MaxResults 0 too)

# GetResultListFiltered's filter inputs after ResultState, in the nodeset's order, with their type and
# the ResultDataType field each compares to
ID_FILTERS = (("MeasId", "MeasIdDataType"), ("PartId", "PartIdDataType"),
              ("ExternalRecipeId", "RecipeIdExternalDataType"), ("InternalRecipeId", "RecipeIdInternalDataType"),
              ("ExternalConfigurationId", "ConfigurationIdDataType"),
              ("InternalConfigurationId", "ConfigurationIdDataType"), ("ProductId", "ProductIdDataType"),
              ("JobId", "JobIdDataType"))


async def build_result_types(server, idx: int) -> Dict[str, object]:
    """The nodeset's result types in namespace ``idx`` (DataType nodes with their DataTypeDefinition,
    which clients such as node-opcua decode the structures by), loaded as asyncua classes: name -> the
    DataType's NodeId (``NAME``) and, for structures, the class (``NAME class``; one class per name in
    asyncua's ``ua``: a second server in the process whose type has another NodeId replaces it)."""
    from asyncua import ua
    from asyncua.common.structures104 import (load_basetype_alias_xml_import, load_custom_struct, new_struct,
                                              new_struct_field)

    # the nodeset's TrimmedString and Handle are OPC 10000-5's (1.05) of the same names: those are used
    types: Dict[str, object] = {"TrimmedString": ua.NodeId(ua.ObjectIds.TrimmedString),
                                "Handle": ua.NodeId(ua.ObjectIds.Handle)}
    state = await server.get_node(ua.NodeId(ua.ObjectIds.Int32)).add_data_type(
        ua.NodeId(0, idx), ua.QualifiedName("ResultStateDataType", idx))
    types["ResultStateDataType"] = state.nodeid
    await load_basetype_alias_xml_import(server, "ResultStateDataType", state.nodeid, ua.NodeId(ua.ObjectIds.Int32))

    def field(name, data_type, optional=False, array=False):
        return new_struct_field(name, data_type, array=array, optional=optional)

    trimmed = types["TrimmedString"]
    described = [field("Description", ua.VariantType.LocalizedText, optional=True)]
    binary_id = [field("Version", trimmed, optional=True), field("Hash", ua.VariantType.ByteString, optional=True),
                 field("HashAlgorithm", ua.VariantType.String, optional=True)] + described
    for name, more in (("ResultIdDataType", []), ("JobIdDataType", []), ("MeasIdDataType", described),
                       ("PartIdDataType", described), ("ProductIdDataType", described),
                       ("RecipeIdExternalDataType", binary_id), ("RecipeIdInternalDataType", binary_id),
                       ("ConfigurationIdDataType", binary_id)):
        node, _ = await new_struct(server, idx, name, [field("Id", trimmed)] + more)
        types[name], types[f"{name} class"] = node.nodeid, await load_custom_struct(node)
    utc, duration = ua.NodeId(ua.ObjectIds.UtcTime), ua.NodeId(ua.ObjectIds.Duration)
    node, _ = await new_struct(server, idx, "ProcessingTimesDataType", [
        field("StartTime", utc), field("EndTime", utc), field("AcquisitionDuration", duration, optional=True),
        field("ProcessingDuration", duration, optional=True)])
    types["ProcessingTimesDataType"] = node.nodeid
    types["ProcessingTimesDataType class"] = await load_custom_struct(node)
    node, _ = await new_struct(server, idx, "ResultDataType", [
        field("ResultId", types["ResultIdDataType"]), field("HasTransferableDataOnFile", ua.VariantType.Boolean, True),
        field("IsPartial", ua.VariantType.Boolean), field("IsSimulated", ua.VariantType.Boolean, True),
        field("ResultState", types["ResultStateDataType"]), field("MeasId", types["MeasIdDataType"], True),
        field("PartId", types["PartIdDataType"], True),
        field("ExternalRecipeId", types["RecipeIdExternalDataType"], True),
        field("InternalRecipeId", types["RecipeIdInternalDataType"]),
        field("ProductId", types["ProductIdDataType"], True),
        field("ExternalConfigurationId", types["ConfigurationIdDataType"], True),
        field("InternalConfigurationId", types["ConfigurationIdDataType"]),
        field("JobId", types["JobIdDataType"]), field("CreationTime", utc),
        field("ProcessingTimes", types["ProcessingTimesDataType"], True),
        field("ResultContent", ua.NodeId(ua.ObjectIds.BaseDataType), True, array=True)])
    types["ResultDataType"], types["ResultDataType class"] = node.nodeid, await load_custom_struct(node)
    return types


@dataclass(frozen=True)
class HeldResult:
    """One result as GetResultListFiltered compares it (the ids' texts by ResultDataType field name, and
    ResultState) and as it is handed out (``result``, a ResultDataType)."""
    result_id: str
    result_state: int
    ids: Dict[str, str]
    result: object


def result_data(types: Dict[str, object], part, job: str, meas: str, product: str, state: int,
                content: str) -> HeldResult:
    """A judged part (PartResult) as a HeldResult: the fields its ResultReady event carries."""
    from asyncua import ua

    def typed(name, text):
        return types[f"{name} class"](Id=text)

    end = part.trigger_time + part.verdict_s
    times = types["ProcessingTimesDataType class"](
        StartTime=datetime.fromtimestamp(part.trigger_time, timezone.utc),
        EndTime=datetime.fromtimestamp(end, timezone.utc),
        AcquisitionDuration=part.acquired_s * 1000.0,
        ProcessingDuration=max(0.0, part.verdict_s - part.acquired_s) * 1000.0)
    ids = {"MeasId": meas, "PartId": part.part_id, "ExternalRecipeId": str(part.recipe),
           "InternalRecipeId": str(part.recipe), "InternalConfigurationId": part.model_sha256, "ProductId": product,
           "JobId": job}
    result = types["ResultDataType class"](
        ResultId=typed("ResultIdDataType", part.result_id), HasTransferableDataOnFile=False,
        IsPartial=False, IsSimulated=False, ResultState=state,
        MeasId=typed("MeasIdDataType", meas), PartId=typed("PartIdDataType", part.part_id),
        ExternalRecipeId=typed("RecipeIdExternalDataType", ids["ExternalRecipeId"]),
        InternalRecipeId=typed("RecipeIdInternalDataType", ids["InternalRecipeId"]),
        ProductId=typed("ProductIdDataType", product), ExternalConfigurationId=None,
        InternalConfigurationId=typed("ConfigurationIdDataType", part.model_sha256),
        JobId=typed("JobIdDataType", job), CreationTime=datetime.fromtimestamp(end, timezone.utc),
        ProcessingTimes=times, ResultContent=[ua.Variant(content, ua.VariantType.String)])
    return HeldResult(part.result_id, state, ids, result)


class ResultHistory:
    """The last ``size`` results of the run, in the order they were published (ResultIds rise)."""

    def __init__(self, size: int = RESULT_HISTORY):
        self._held: Deque[HeldResult] = deque(maxlen=size)
        self._by_id: Dict[str, HeldResult] = {}

    def add(self, held: HeldResult) -> None:
        if len(self._held) == self._held.maxlen:
            gone = self._held[0]
            if self._by_id.get(gone.result_id) is gone:
                del self._by_id[gone.result_id]
        self._held.append(held)
        self._by_id[held.result_id] = held

    def by_id(self, result_id: str) -> Optional[HeldResult]:
        return self._by_id.get(result_id)

    def newest_first(self, result_state: int, ids: Dict[str, str]):
        """The held results matching the filter (ResultState 0 and empty ids match all), newest first."""
        for held in reversed(self._held):
            if result_state and held.result_state != result_state:
                continue
            if all(held.ids.get(name, "") == text for name, text in ids.items() if text):
                yield held

    def __len__(self) -> int:
        return len(self._held)

