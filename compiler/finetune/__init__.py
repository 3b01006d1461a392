"""compiler/finetune."""
