"""Triton's model_config.proto as a table (triton-inference-server/common, protobuf/model_config.proto): every
message a config.pbtxt can hold, its enums and oneofs, so that models.tritonconfig checks a config as Triton's
parser does without a protobuf library. tests/test_tritonconfig_strict.py compares it with tritonclient's
generated model_config_pb2.
"""

from __future__ import annotations

from dataclasses import dataclass

POLICIES = ("latest", "all", "specific")  # ModelVersionPolicy's oneof

# Triton's model_config.proto (triton-inference-server/common, protobuf/model_config.proto): every message a
# config.pbtxt can hold as "field:type" ("*": repeated; a type name is looked up from the message outwards, as protobuf
# does), its enums (values in number order: each numbers its values 0, 1, 2, ...) and its oneofs (one member at most).
_PROTO_MESSAGES = {
    "ModelConfig": "name:string platform:string backend:string runtime:string version_policy:ModelVersionPolicy "
                   "max_batch_size:int32 input:ModelInput* output:ModelOutput* batch_input:BatchInput* "
                   "batch_output:BatchOutput* optimization:ModelOptimizationPolicy "
                   "dynamic_batching:ModelDynamicBatching sequence_batching:ModelSequenceBatching "
                   "ensemble_scheduling:ModelEnsembling instance_group:ModelInstanceGroup* "
                   "default_model_filename:string cc_model_filenames:map<string,string> "
                   "metric_tags:map<string,string> parameters:map<string,ModelParameter> model_warmup:ModelWarmup* "
                   "model_operations:ModelOperations model_transaction_policy:ModelTransactionPolicy "
                   "model_repository_agents:ModelRepositoryAgents response_cache:ModelResponseCache "
                   "model_metrics:ModelMetrics",
    "ModelRateLimiter": "resources:Resource* priority:uint32",
    "ModelRateLimiter.Resource": "name:string global:bool count:uint32",
    "ModelInstanceGroup": "name:string kind:Kind count:int32 rate_limiter:ModelRateLimiter gpus:int32* "
                          "secondary_devices:SecondaryDevice* profile:string* passive:bool host_policy:string",
    "ModelInstanceGroup.SecondaryDevice": "kind:SecondaryDeviceKind device_id:int64",
    "ModelTensorReshape": "shape:int64*",
    "ModelInput": "name:string data_type:DataType format:Format dims:int64* reshape:ModelTensorReshape "
                  "is_shape_tensor:bool allow_ragged_batch:bool optional:bool is_non_linear_format_io:bool",
    "ModelOutput": "name:string data_type:DataType dims:int64* reshape:ModelTensorReshape label_filename:string "
                   "is_shape_tensor:bool is_non_linear_format_io:bool",
    "BatchInput": "kind:Kind target_name:string* data_type:DataType source_input:string*",
    "BatchOutput": "target_name:string* kind:Kind source_input:string*",
    "ModelVersionPolicy": "latest:Latest all:All specific:Specific",
    "ModelVersionPolicy.Latest": "num_versions:uint32",
    "ModelVersionPolicy.All": "",
    "ModelVersionPolicy.Specific": "versions:int64*",
    "ModelOptimizationPolicy": "graph:Graph priority:ModelPriority cuda:Cuda "
                               "execution_accelerators:ExecutionAccelerators input_pinned_memory:PinnedMemoryBuffer "
                               "output_pinned_memory:PinnedMemoryBuffer "
                               "gather_kernel_buffer_threshold:uint32 eager_batching:bool",
    "ModelOptimizationPolicy.Graph": "level:int32",
    "ModelOptimizationPolicy.Cuda": "graphs:bool busy_wait_events:bool graph_spec:GraphSpec* output_copy_stream:bool",
    "ModelOptimizationPolicy.Cuda.GraphSpec": "batch_size:int32 input:map<string,Shape> graph_lower_bound:LowerBound",
    "ModelOptimizationPolicy.Cuda.GraphSpec.Shape": "dim:int64*",
    "ModelOptimizationPolicy.Cuda.GraphSpec.LowerBound": "batch_size:int32 input:map<string,Shape>",
    "ModelOptimizationPolicy.ExecutionAccelerators": "gpu_execution_accelerator:Accelerator* "
                                                     "cpu_execution_accelerator:Accelerator*",
    "ModelOptimizationPolicy.ExecutionAccelerators.Accelerator": "name:string parameters:map<string,string>",
    "ModelOptimizationPolicy.PinnedMemoryBuffer": "enable:bool",
    "ModelQueuePolicy": "timeout_action:TimeoutAction default_timeout_microseconds:uint64 allow_timeout_override:bool "
                        "max_queue_size:uint32",
    "ModelDynamicBatching": "preferred_batch_size:int32* max_queue_delay_microseconds:uint64 preserve_ordering:bool "
                            "priority_levels:uint64 default_priority_level:uint64 "
                            "default_queue_policy:ModelQueuePolicy priority_queue_policy:map<uint64,ModelQueuePolicy>",
    "ModelSequenceBatching": "direct:StrategyDirect oldest:StrategyOldest max_sequence_idle_microseconds:uint64 "
                             "control_input:ControlInput* state:State* iterative_sequence:bool",
    "ModelSequenceBatching.Control": "kind:Kind int32_false_true:int32* fp32_false_true:float* bool_false_true:bool* "
                                     "data_type:DataType",
    "ModelSequenceBatching.ControlInput": "name:string control:Control*",
    "ModelSequenceBatching.InitialState": "data_type:DataType dims:int64* zero_data:bool data_file:string name:string",
    "ModelSequenceBatching.State": "input_name:string output_name:string data_type:DataType dims:int64* "
                                   "initial_state:InitialState* use_same_buffer_for_input_output:bool "
                                   "use_growable_memory:bool",
    "ModelSequenceBatching.StrategyDirect": "max_queue_delay_microseconds:uint64 minimum_slot_utilization:float",
    "ModelSequenceBatching.StrategyOldest": "max_candidate_sequences:int32 preferred_batch_size:int32* "
                                            "max_queue_delay_microseconds:uint64 preserve_ordering:bool",
    "ModelEnsembling": "step:Step* max_inflight_requests:uint32",
    "ModelEnsembling.Step": "model_name:string model_version:int64 input_map:map<string,string> "
                            "output_map:map<string,string> model_namespace:string",
    "ModelParameter": "string_value:string",
    "ModelWarmup": "name:string batch_size:uint32 inputs:map<string,Input> count:uint32",
    "ModelWarmup.Input": "data_type:DataType dims:int64* zero_data:bool random_data:bool input_data_file:string",
    "ModelOperations": "op_library_filename:string*",
    "ModelTransactionPolicy": "decoupled:bool",
    "ModelRepositoryAgents": "agents:Agent*",
    "ModelRepositoryAgents.Agent": "name:string parameters:map<string,string>",
    "ModelResponseCache": "enable:bool",
    "ModelMetrics": "metric_control:MetricControl*",
    "ModelMetrics.MetricControl": "metric_identifier:MetricIdentifier histogram_options:HistogramOptions",
    "ModelMetrics.MetricControl.MetricIdentifier": "family:string",
    "ModelMetrics.MetricControl.HistogramOptions": "buckets:double*",
}
ENUMS = {
    "DataType": ("TYPE_INVALID", "TYPE_BOOL", "TYPE_UINT8", "TYPE_UINT16", "TYPE_UINT32", "TYPE_UINT64", "TYPE_INT8",
                 "TYPE_INT16", "TYPE_INT32", "TYPE_INT64", "TYPE_FP16", "TYPE_FP32", "TYPE_FP64", "TYPE_STRING",
                 "TYPE_BF16"),
    "ModelInstanceGroup.Kind": ("KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL"),
    "ModelInstanceGroup.SecondaryDevice.SecondaryDeviceKind": ("KIND_NVDLA",),
    "ModelInput.Format": ("FORMAT_NONE", "FORMAT_NHWC", "FORMAT_NCHW"),
    "BatchInput.Kind": ("BATCH_ELEMENT_COUNT", "BATCH_ACCUMULATED_ELEMENT_COUNT",
                        "BATCH_ACCUMULATED_ELEMENT_COUNT_WITH_ZERO", "BATCH_MAX_ELEMENT_COUNT_AS_SHAPE",
                        "BATCH_ITEM_SHAPE", "BATCH_ITEM_SHAPE_FLATTEN"),
    "BatchOutput.Kind": ("BATCH_SCATTER_WITH_INPUT_SHAPE",),
    "ModelOptimizationPolicy.ModelPriority": ("PRIORITY_DEFAULT", "PRIORITY_MAX", "PRIORITY_MIN"),
    "ModelQueuePolicy.TimeoutAction": ("REJECT", "DELAY"),
    "ModelSequenceBatching.Control.Kind": ("CONTROL_SEQUENCE_START", "CONTROL_SEQUENCE_READY",
                                           "CONTROL_SEQUENCE_END", "CONTROL_SEQUENCE_CORRID"),
}
ONEOFS = {
    "ModelConfig": ("dynamic_batching", "sequence_batching", "ensemble_scheduling"),
    "ModelVersionPolicy": POLICIES,
    "ModelSequenceBatching": ("direct", "oldest"),
    "ModelSequenceBatching.InitialState": ("zero_data", "data_file"),
    "ModelWarmup.Input": ("zero_data", "random_data", "input_data_file"),
}
INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1), "uint32": (0, 2**32 - 1),
               "uint64": (0, 2**64 - 1)}
SCALARS = frozenset({"string", "bool", "float", "double", *INT_RANGES})
@dataclass(frozen=True)
class ProtoField:
    """One field of a model_config.proto message: a scalar type or the full name of an enum or message."""

    type: str
    repeated: bool = False


def _resolve(type_name: str, scope: str) -> str:
    if type_name in SCALARS:
        return type_name
    parts = scope.split(".")
    for i in range(len(parts), -1, -1):
        candidate = ".".join([*parts[:i], type_name])
        if candidate in _PROTO_MESSAGES or candidate in ENUMS:
            return candidate
    raise KeyError(f"{type_name} in {scope}")  # a typo in the table above: fails at import


def _schema() -> dict[str, dict[str, ProtoField]]:
    schema: dict[str, dict[str, ProtoField]] = {}
    for message, spec in _PROTO_MESSAGES.items():
        fields = schema.setdefault(message, {})
        for item in spec.split():
            name, _, type_name = item.partition(":")
            if type_name.startswith("map<"):  # a repeated entry message { key: K value: V }, named as protobuf does
                key, value = type_name[4:-1].split(",")
                entry = f"{message}.{name.title().replace('_', '')}Entry"
                schema[entry] = {"key": ProtoField(key), "value": ProtoField(_resolve(value, message))}
                fields[name] = ProtoField(entry, repeated=True)
            else:
                fields[name] = ProtoField(_resolve(type_name.rstrip("*"), message), type_name.endswith("*"))
    return schema


SCHEMA = _schema()
