"""hfbatch tasks: plain functions that do the work, wrapped as Prefect tasks in `tasks.prefect_tasks`."""
