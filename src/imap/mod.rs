//! IMAP support: sans-I/O codec, rewriters and the session driver.
