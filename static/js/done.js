// End page. The server only renders it once every judgment is stored and the session is complete,
// so the trial runner's local buffer of answers for this session can go. Then: an MTurk session
// submits its assignment to MTurk (the form's action is turkSubmitTo/mturk/externalSubmit, checked
// on the server to be MTurk's live or sandbox site); a Prolific session goes back to Prolific with
// the study's completion code after a moment in which the code stays readable.

import { bufferKey } from "./buffer.js";

const PROLIFIC_DELAY_MS = 1000;

const done = document.getElementById("done");
try {
  localStorage.removeItem(bufferKey(done.dataset.token));
} catch (error) {
  console.warn("could not clear the local answer buffer:", error);
}

const form = document.getElementById("mturk-submit");
if (form) {
  form.submit();
} else if (done.dataset.prolificUrl) {
  setTimeout(() => window.location.replace(done.dataset.prolificUrl), PROLIFIC_DELAY_MS);
}
