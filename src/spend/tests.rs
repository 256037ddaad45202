//! Spend control with the memory store: admission, refusals and their
//! OpenAI shape, settlement.
