"""Using a trained model: batch scoring on the ranks of training (predict) and the serving artifact (export)."""
