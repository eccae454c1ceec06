"""The model side: the model manager, the scheduler and its jobs, the compiled step, routing state."""
