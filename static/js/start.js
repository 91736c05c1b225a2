// Landing page of a participant link: a touch-only device (a phone or tablet without mouse or
// keyboard) is told at once that the study needs a computer, and gets no Start button, so no
// session is created for it. The trial runner checks again (trials.js, touchOnly).

function touchOnly() {
  const query = (q) => window.matchMedia(q).matches;
  return navigator.maxTouchPoints > 0 && !query("(any-pointer: fine)") && !query("(any-hover: hover)");
}

if (touchOnly()) {
  const notice = document.getElementById("touch-only");
  const form = document.getElementById("start-form");
  if (notice && form) {
    form.remove();
    notice.hidden = false;
    document.body.dataset.refused = "touch-only";
  }
}
