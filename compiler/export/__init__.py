"""Export: QDQ ONNX for onnxruntime / TensorRT / QCDQ readers, TensorRT's rules, parity, speed, TensorRT engines.

Typical use::

    qm = QuantizedModel(capture(model, example, fold_bn=True))
    formats = apply_plan(qm, plan)
    qm.calibrate(calib_batches)
    exported = export_qdq(qm, "ort", calib=calib_batches, formats=formats)
    check_parity(exported.model, exported.reference, held_out)      # raises ParityError when it fails
    speed_report(exported.model, exported.float_model)              # onnxruntime latency, int8 vs fp32
    exported.save("model.onnx")

``tensorrt_engine`` is imported on demand (it needs TensorRT and a GPU).
"""

from .parity import MIN_TOP1, ModeResult, ParityError, ParityReport, check_parity, ort_session, reference_vs_trained
from .qdq import (
    DEFAULT_OPSET,
    FORMATS,
    BiasQuantizer,
    ExportedModel,
    FP8ActQuantizer,
    FP8WeightQuantizer,
    Profile,
    apply_plan,
    assignment_from_plan,
    bits_summary,
    example_inputs_of,
    export_qdq,
    quantization_step,
    save_model,
)
from .speed import Latency, compare_latency, feeds_for, machine, speed_report
from .trt_rules import TrtRuleError, Violation, assert_trt_compatible, check_trt

__all__ = [
    "reference_vs_trained",
    "DEFAULT_OPSET",
    "FORMATS",
    "MIN_TOP1",
    "BiasQuantizer",
    "ExportedModel",
    "FP8ActQuantizer",
    "FP8WeightQuantizer",
    "Latency",
    "ModeResult",
    "ParityError",
    "ParityReport",
    "Profile",
    "TrtRuleError",
    "Violation",
    "apply_plan",
    "assert_trt_compatible",
    "assignment_from_plan",
    "bits_summary",
    "check_parity",
    "check_trt",
    "compare_latency",
    "example_inputs_of",
    "export_qdq",
    "feeds_for",
    "machine",
    "ort_session",
    "quantization_step",
    "save_model",
    "speed_report",
]
