"""Quality evaluation: perturbation study on captured attention, and (later) engine tasks."""
