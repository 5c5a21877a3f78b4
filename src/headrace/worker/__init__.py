"""The job runner and the webhook outbox dispatcher: in the gateway process (embedded) or in
``headrace worker`` processes (production)."""
