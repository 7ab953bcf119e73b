"""Nightly bulk-explain audit from Apache Airflow (docs/scheduling.md).

RaySubmitJobOperator comes from the Google provider (`pip install apache-airflow-providers-google`)
but talks to any reachable Ray dashboard: it builds a plain `JobSubmissionClient(cluster_address)`
unless the address is a Vertex AI Ray one. Token authentication: set RAY_AUTH_MODE=token and
RAY_AUTH_TOKEN_PATH (or RAY_AUTH_TOKEN) in the Airflow workers' environment; Ray reads them when
the client connects.

The submission id is derived from the run's logical date, so a cleared-and-retried task (or a second
scheduler) cannot start a second Ray job for the same night: Ray refuses a duplicate id. Airflow's
max_active_runs=1 keeps runs from overlapping on the Airflow side, the output's lease
(DST/_lease.json) on the Ray side.
"""

import datetime

try:  # Airflow 3
    from airflow.sdk import DAG
except ImportError:  # Airflow 2
    from airflow import DAG
from airflow.providers.google.cloud.operators.ray import RaySubmitJobOperator

RAY_DASHBOARD = "http://bulk-explain-head-svc.ray.svc.cluster.local:8265"

with DAG(
    dag_id="bulk_explain_nightly",
    schedule="15 2 * * *",
    start_date=datetime.datetime(2026, 11, 1, tzinfo=datetime.timezone.utc),
    catchup=False,
    max_active_runs=1,
    tags=["bulk-explain"],
) as dag:
    RaySubmitJobOperator(
        task_id="audit_pets",
        cluster_address=RAY_DASHBOARD,
        submission_id="bulk-explain-{{ ds }}",
        entrypoint=("bulk-explain run --input s3://data/pets/ --output s3://audits/pets/ "
                    "--model vgg16 --weights imagenet --address auto"),
        wait_for_job_done=True,
        get_job_logs=True,
        submit_job_timeout=6 * 3600,
        retries=0,
    )
