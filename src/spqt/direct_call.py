"""nn.Module calls that skip torch's hook dispatch when no hook would run.

torch's Module.__call__ costs about 4 us on the 2-core VM before it reaches forward (its
wrapper, tracing-state and hook checks); a CPU decode step of the default model makes 210 such
calls (Block, Attention, FeedForward and four linear maps a layer): 0.8 ms of a 12 ms step
outside the GEMVs (issue 18). DirectCallModule calls forward at once unless a hook is registered
(on it, or globally), and then goes through torch's call as before, so calibration's hooks run.
A hooked call's output no longer carries the sums of squares of its values (functional.NORM_SUMS):
a hook may have changed it in place, and the next map would fold its norm with stale sums.
"""

from torch import nn
from torch.nn.modules import module as torch_module

from spqt.functional import NORM_SUMS


def hooked(module: nn.Module) -> bool:
    """Whether calling the module would run a hook (its own or a global one)."""
    return bool(module._forward_pre_hooks or module._forward_hooks or module._backward_pre_hooks
                or module._backward_hooks or torch_module._global_forward_pre_hooks
                or torch_module._global_forward_hooks or torch_module._global_backward_pre_hooks
                or torch_module._global_backward_hooks)


class DirectCallModule(nn.Module):
    def __call__(self, *args, **kwargs):
        if hooked(self):
            out = super().__call__(*args, **kwargs)
            if hasattr(out, NORM_SUMS):
                delattr(out, NORM_SUMS)
            return out
        return self.forward(*args, **kwargs)
