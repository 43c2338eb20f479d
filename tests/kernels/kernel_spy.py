"""A stand-in for a ``@triton.jit`` kernel in tests: records each launch (grid, positional args, keyword args) and
then launches the real kernel, so a test can check what a launcher really passed (TMA on or off, the grid of a
persistent launch, the buffer a kernel wrote)."""


class KernelSpy:
    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.calls.append((grid, args, kw))
            return self.kernel[grid](*args, **kw)
        return launch

    def kwargs(self) -> list[dict]:
        """The keyword arguments (constexprs) of each launch, in order."""
        return [kw for _, _, kw in self.calls]
