//! The OSC receiver thread: a UDP socket, decode and dispatch, and a bounded channel to the
//! control loop. Refused messages are counted and logged at most once a second.
