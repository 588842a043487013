"""The orchestrator: durable workflow execution (DAGs of tasks) with a REST API."""
