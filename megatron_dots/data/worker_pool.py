"""Worker process pools for the data tools (`preprocess`, `utk`): one start method choice."""

import multiprocessing


def worker_pool(workers: int, initializer, initargs):
    """A `multiprocessing` pool of `workers` processes, each running `initializer(*initargs)`
    first. fork where the platform has it (workers start at once, without re-importing torch
    and megatron), spawn elsewhere. Use it as a context manager: it terminates the workers
    however the block ends."""
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method).Pool(workers, initializer=initializer,
                                                    initargs=initargs)
