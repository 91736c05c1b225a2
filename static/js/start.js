// Landing page of a participant link. Refused here, before any session is created (the form
// is removed, a notice says why): a touch-only device (a phone or tablet without mouse or
// keyboard), and a screen whose device pixel ratio is not whole when the study draws images
// at their own CSS size and refuses such screens (display_scale 0, display_rule "refuse").
// The trial runner checks both again (trials.js: touchOnly, ensurePixelScale).

function touchOnly() {
  const query = (q) => window.matchMedia(q).matches;
  return navigator.maxTouchPoints > 0 && !query("(any-pointer: fine)") && !query("(any-hover: hover)");
}

function refuse(form, noticeId) {
  const notice = document.getElementById(noticeId);
  if (!notice) return;
  form.remove();
  notice.hidden = false;
  document.body.dataset.refused = noticeId;
}

const form = document.getElementById("start-form");
if (form) {
  const ratio = window.devicePixelRatio;
  const whole = Math.abs(ratio - Math.round(ratio)) < 1e-3; // studyapp.display.WHOLE_TOLERANCE
  if (touchOnly()) {
    refuse(form, "touch-only");
  } else if (form.dataset.displayRule === "refuse" && form.dataset.displayScale === "0" && !whole) {
    refuse(form, "display-refused");
  }
}
