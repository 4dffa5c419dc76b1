"""Names of the tags the registry writes on model versions, registered models and runs.

Version tags are the contract with MLflow UI users (they see quantization, size, lineage and
evaluation results without this package) and between the workflows, so every key lives here.
"""

# Model version tags written by register().
QUANTIZATION = "quantization"
SIZE_BYTES = "size_bytes"
SIZE_MB = "size_mb"
SOURCE = "source"
SOURCE_KIND = "source_kind"
BASE_MODEL = "base_model"
ADAPTER = "adapter"
CHECKSUMS_DIGEST = "checksums_digest"
SOURCE_RUN = "source_run"  # the run recorded in the flavor's lineage (training run for runs:/ sources)
REGISTER_RUN = "register_run"  # the registration run that converted and logged this version

# Model version tags written by evaluate(): "eval.<metric>" plus these.
EVAL_PREFIX = "eval."
EVAL_RUN_ID = "eval.run_id"
EVAL_DATASET = "eval.dataset"  # the dataset digest
EVAL_DATASET_NAME = "eval.dataset_name"
EVAL_HEADLINE = "eval.headline"  # "cer" or "wer"
EVAL_TIME = "eval.time"
EVAL_NUMBER_RULES = "eval.number_rules"  # per language, how numbers were made comparable ("none": not)
EVAL_REPORT = "eval.report"  # artifact URI of the HTML page of the worst utterances

# Model version tags the service writes on a shadowed candidate (bento config shadow=...): its
# figures against the production version's answers to the same live requests.
SHADOW_PREFIX = "shadow."
SHADOW_FIGURES = ("agreement", "wer", "cer", "latency_ratio", "requests", "dropped", "failed")
SHADOW_PRODUCTION_VERSION = "shadow.production_version"
SHADOW_TIME = "shadow.time"

# Run tags of evaluation runs, linking them to the version (searchable).
RUN_KIND = "whisper_registry.kind"  # register | evaluate | compare | finetune
RUN_MODEL_NAME = "whisper_registry.model_name"
RUN_MODEL_VERSION = "whisper_registry.model_version"
RUN_MODEL_URI = "whisper_registry.model_uri"
RUN_DATASET_DIGEST = "whisper_registry.dataset_digest"
RUN_SKIPPED_ROWS = "skipped_rows"  # evaluation runs: the rows left out (skip_bad)
RUN_RESUMED_FROM = "whisper_registry.resumed_from_run"  # fine-tune runs: the interrupted run continued
RUN_INTERRUPTED_BY = "interrupted_by"  # fine-tune runs ended by a signal: its name

# Registered model tags of the audit trail: "audit.<alias>.<0001>" = JSON event.
AUDIT_PREFIX = "audit."
# Model version tags summarising the latest promotion to an alias: "promoted.<alias>.<field>".
PROMOTED_PREFIX = "promoted."
# Registered model tag of an alias lock (a registered model "<name>.<alias>.lock"): its holder.
LOCK_OWNER = "whisper_registry.lock"
