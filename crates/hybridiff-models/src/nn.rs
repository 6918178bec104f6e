//! Small building blocks shared by the models (attention, activations).
