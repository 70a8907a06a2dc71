#include "calls.h"

#include <optional>

#include "tpfuse/core/error.h"
#include "tpfuse/ops/family.h"
#include "tpfuse/ops/mm_all_reduce_base.h"
#include "tpfuse/ops/validate.h"

namespace tpfuse::fuzz {

namespace {

// gather_out as the _out form takes it: none when not given.
std::optional<TensorView> gather_out(const MaterializedCall& call) {
  return call.views[static_cast<int>(Arg::gather_out)];
}

CallShape validate(const CallSpec& spec, const MaterializedCall& call, int group_size) {
  const TensorView x1 = call.view(Arg::x1), x2 = call.view(Arg::x2);
  const bool out_form = call_form(spec) == Form::out;
  switch (spec.op) {
    case Op::mm_all_reduce_base: {
      const CallShape shape = validate_call(x1, x2, call.options);
      if (out_form) validate_out(shape, call.view(Arg::out), x1, x2, call.options);
      return shape;
    }
    case Op::all_gather_base_mm: {
      const CallShape shape =
          validate_all_gather_mm(x1, x2, spec.world_size, group_size, call.all_gather);
      if (out_form) {
        validate_all_gather_mm_out(shape, call.view(Arg::output), gather_out(call), x1, x2,
                                   call.all_gather);
      }
      return shape;
    }
    case Op::mm_reduce_scatter_base: {
      const CallShape shape =
          validate_mm_reduce_scatter(x1, x2, spec.world_size, group_size, call.reduce_scatter);
      if (out_form) {
        validate_mm_reduce_scatter_out(shape, call.view(Arg::output), x1, x2, call.reduce_scatter);
      }
      return shape;
    }
    case Op::mm_all_reduce_add_rms_norm:
    case Op::mm_all_reduce_add_rms_norm_in_place: {
      const TensorView residual = call.view(Arg::residual), gamma = call.view(Arg::gamma);
      const CallShape shape = validate_add_rms_norm(x1, x2, residual, gamma, call.add_rms_norm);
      if (out_form) {
        validate_add_rms_norm_out(shape, call.view(Arg::y), call.view(Arg::norm_out), x1, x2,
                                  residual, gamma, call.add_rms_norm);
      }
      if (call_form(spec) == Form::in_place) {
        validate_add_rms_norm_in_place(x1, x2, residual, gamma, call.add_rms_norm);
      }
      return shape;
    }
  }
  throw InternalError("validate: unknown operator");
}

}  // namespace

std::string validation_error(const CallSpec& spec, const MaterializedCall& call, int group_size,
                             CallShape& shape) {
  try {
    shape = validate(spec, call, group_size);
    return "";
  } catch (const InvalidArgument& e) {
    const std::string message = e.what();
    return message.empty() ? "(empty message)" : message;
  }
}

void run_operator(const CallSpec& spec, const MaterializedCall& call, std::string_view hcom,
                  Results& results) {
  const TensorView x1 = call.view(Arg::x1), x2 = call.view(Arg::x2);
  const TensorView residual = call.view(Arg::residual), gamma = call.view(Arg::gamma);
  const Form form = call_form(spec);
  switch (spec.op) {
    case Op::mm_all_reduce_base:
      if (form == Form::out) {
        mm_all_reduce_base_out(x1, x2, hcom, call.options, call.view(Arg::out));
      } else {
        results.out = mm_all_reduce_base(x1, x2, hcom, call.options);
      }
      return;
    case Op::all_gather_base_mm:
      if (form == Form::out) {
        all_gather_base_mm_out(x1, x2, hcom, spec.world_size, call.all_gather,
                               call.view(Arg::output), gather_out(call));
      } else {
        AllGatherMmResult result =
            all_gather_base_mm(x1, x2, hcom, spec.world_size, call.all_gather);
        results.output = std::move(result.output);
        results.gather_out = std::move(result.gather_out);
      }
      return;
    case Op::mm_reduce_scatter_base:
      if (form == Form::out) {
        mm_reduce_scatter_base_out(x1, x2, hcom, spec.world_size, call.reduce_scatter,
                                   call.view(Arg::output));
      } else {
        results.output = mm_reduce_scatter_base(x1, x2, hcom, spec.world_size, call.reduce_scatter);
      }
      return;
    case Op::mm_all_reduce_add_rms_norm:
      if (form == Form::out) {
        mm_all_reduce_add_rms_norm_out(x1, x2, residual, gamma, hcom, call.add_rms_norm,
                                       call.view(Arg::y), call.view(Arg::norm_out));
      } else {
        AddRmsNormResult result =
            mm_all_reduce_add_rms_norm(x1, x2, residual, gamma, hcom, call.add_rms_norm);
        results.y = std::move(result.y);
        results.norm_out = std::move(result.norm_out);
      }
      return;
    case Op::mm_all_reduce_add_rms_norm_in_place:
      results.norm_out =
          mm_all_reduce_add_rms_norm_(x1, x2, residual, gamma, hcom, call.add_rms_norm);
      return;
  }
}

}  // namespace tpfuse::fuzz
