"""Prints the largest relative error per quantity over the cases of test_layer_torch.py that ran."""


def pytest_terminal_summary(terminalreporter):
    import sys

    module = sys.modules.get("test_layer_torch")
    if module is None or not getattr(module, "LARGEST", None):
        return
    largest = module.LARGEST
    text = ", ".join(f"{name} {largest[name]:.2e}" for name in sorted(largest))
    terminalreporter.write_line(f"largest relative error (max |locmoe - torch| / max |torch|): {text}")
    dropped = module.DROPPED
    terminalreporter.write_line(f"cases with capacity drops: {len(dropped)}, dropped choices in all: {sum(dropped)}")
