"""The package's two exception types: bad user input (which the command line turns into a one-line message and a
non-zero exit) and pretrained weights that cannot be loaded."""


class UserInputError(Exception):
    """Something the user passed (a path, a model name, a checkpoint) cannot be used; the message says why and what to do."""


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights could not be loaded: names the file (or Hub repository) and the problem."""
